"""report.html: the Evaluate step's self-contained page, checked as text and rendered in Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.local.jobs import tar_model

import chromium
from conftest import ROOT, import_script
from in_process import run_main
from test_train import FAST, run_train, write_split

EVALUATE = ROOT / "scripts" / "evaluate" / "evaluate.py"
evaluate_script = import_script("evaluate", "evaluate")
SECTIONS = ("Headline", "Per class", "Confusion matrix", "Loss curves", "Debugger rules", "Robustness",
            "Data", "Test photos")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real tiny training (train.py, 3 epochs at 32 px) and its test split, as a run has them."""
    root = tmp_path_factory.mktemp("report")
    data = {"train": write_split(root / "train", 8, seed=1),
            "validation": write_split(root / "validation", 4, seed=2)}
    write_split(root / "test", 4, seed=3)
    run_train(root, data, *FAST, "--epochs", "3", "--checkpoint_dir", "none", "--pretrained", "none",
              "--decode", "mean", "--recall_floor", "0.5")
    tar_model(root / "model", root / "model.tar.gz")
    (root / "report").mkdir()
    (root / "report" / "data_report.json").write_text(json.dumps({
        "counts": {"train": {"1": 8, "2": 8, "3": 8, "4": 8, "5": 8, "total": 40},
                   "validation": {"1": 4, "2": 4, "3": 4, "4": 4, "5": 4, "total": 20},
                   "test": {"1": 4, "2": 4, "3": 4, "4": 4, "5": 4, "total": 20}},
        "rejections_by_kind": {"corrupt": 2, "unlabelled": 1}}))
    (root / "previous.json").write_text(json.dumps({"version": 7, "metrics": {"accuracy": 0.123, "rmse": 1.9}}))
    return root


def evaluate(root: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(EVALUATE), "--model", str(root / "model.tar.gz"),
                           "--test", str(root / "test"), "--output", str(root / out), *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def report(run) -> Path:
    evaluate(run, "evaluation", "--data-report", str(run / "report"), "--previous-metrics",
             str(run / "previous.json"), "--threshold", "0.5")
    return run / "evaluation" / "report.html"


@pytest.mark.slow
def test_report_is_self_contained_and_has_every_section(report):
    page = report.read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page
    # Nothing to fetch: no scripts, no links, every image inline.
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page) and "<script" not in page
    images = re.findall(r'<img class="(\w+)" src="([^"]*)"', page)
    assert all(src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for _, src in images)
    # Confusion matrix, loss curves, robustness; 20 test photos.
    assert sum(kind == "plot" for kind, _ in images) == 3 and sum(kind == "photo" for kind, _ in images) == 20
    assert "previous version (7)" in page and "0.1230" in page  # the previous version's accuracy
    assert "corrupt 2" in page and "unlabelled 1" in page


@pytest.mark.slow
def test_the_decoding_and_its_cuts_are_stated(report, run):
    cuts = json.loads((run / "model" / "model_config.json").read_text())["cuts"]
    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert evaluation["decoding"] == {"head": "ordinal", "decode": "mean", "tta": "none", "cuts": cuts,
                                      "recall_floor": 0.5}
    page = report.read_text()
    assert ("Counts decoded as the rounded expected count, cut on the expected count at "
            + ", ".join(f"{c:.4g}" for c in cuts) + " (Train moved the end cuts where count 1 or count 5 was "
            "under 0.5 recall on the validation split") in page


@pytest.mark.slow
def test_gate_previous_version_and_worst_mistakes_first(report, run):
    page = report.read_text()
    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    accuracy = evaluation["multiclass_classification_metrics"]["accuracy"]["value"]
    assert ("pass" if accuracy >= 0.5 else "FAIL") + " (&ge; 0.5)" in page
    # --previous-metrics names no artifact: the previous version is not scored on these photos, so
    # no change is printed, and its own numbers are labelled as measured on other photos.
    assert f"{accuracy - 0.123:+.4f}" not in page and "change (this run" not in page
    assert ("No change is shown against the previous version (7): version 7 was not scored on these "
            "photos: the registry records no artifact for it.") in page
    assert "measured on its own test split (other photos, not comparable with this run's): accuracy 0.1230, rmse 1.9000" in page
    errors = [abs(int(t) - int(p)) for t, p in re.findall(r"true (\d) &middot; predicted (\d)", page)]
    assert len(errors) == 20 and errors == sorted(errors, reverse=True)
    majority, lowest = (evaluation["constant_answer_baselines"][k] for k in ("majority", "lowest_rmse"))
    assert (f"The best a constant answer does on these photos: accuracy {majority['accuracy']:.4f} "
            f"(always {majority['answer']}), RMSE {lowest['rmse']:.4f} (always {lowest['answer']}).") in page
    clean = accuracy
    for kind, r in evaluation["robustness"].items():
        assert f"<td>{kind}</td><td>{r['accuracy']:.4f}</td><td>{r['accuracy'] / clean:.2f}</td>" in page


@pytest.mark.slow
def test_rule_verdicts_are_in_the_report_and_in_evaluation_json(report, run):
    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    verdicts = {v["rule"]: v["status"] for v in evaluation["debugger_rules"]["verdicts"]}
    assert set(verdicts) == {"LossNotDecreasing", "Overfit", "VanishingGradient", "ExplodingTensor"}
    page = report.read_text()
    for rule, status in verdicts.items():
        assert f"<td>{rule}</td>" in page and status in page
    debugger = json.loads((run / "model" / "debugger.json").read_text())
    if debugger["status"] == "missing":  # smdebug is not in this environment: the report says so
        assert "Debugger data missing" in page and debugger["reason"][:40] in page
        assert verdicts["VanishingGradient"] == "NoData"


def report_of(model_dir: Path, test: Path, out: Path) -> str:
    """Evaluate the artifact packed from `model_dir` without corruptions; the report's HTML."""
    tar_model(model_dir, out.with_suffix(".tar.gz"))
    run_main(evaluate_script.main, "--model", out.with_suffix(".tar.gz"), "--test", test, "--output", out,
             "--corruptions", "none", check=True)
    return (out / "report.html").read_text()


@pytest.mark.slow
def test_without_history_or_data_report_the_report_says_what_is_missing(run):
    bare = run / "bare"
    shutil.copytree(run / "model", bare)
    (bare / "history.json").unlink()
    (bare / "debugger.json").unlink()
    page = report_of(bare, run / "test", run / "bare-eval")
    assert "holds no training history" in page and "No data report" in page
    assert "the model artifact has no debugger.json" in page and "No previous registered version" in page


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_in_headless_chromium(report, tmp_path):
    if not chromium.CHROMIUM.is_file():
        pytest.skip(f"{chromium.CHROMIUM} is absent (apt-get install -y chromium; .ci/run installs it)")
    widths = chromium.image_widths(report)
    assert len(widths) == 23 and all(w > 0 for w in widths), widths
    png = chromium.screenshot(report, tmp_path / "report.png", height=1600)
    from PIL import Image
    with Image.open(png) as shot:
        assert shot.size == (1200, 1600)
        colours = shot.convert("RGB").resize((60, 80)).getcolors(4800)
    assert colours is None or len(colours) > 20  # a rendered page, not a blank one


@pytest.mark.slow
def test_the_run_summary_links_the_report_and_lists_the_verdicts(tmp_path):
    from pipeline.local.summary import summarize
    evaluation = {"multiclass_classification_metrics": {"accuracy": {"value": 0.7}},
                  "regression_metrics": {"rmse": {"value": 0.5}},
                  "constant_answer_baselines": {"majority": {"answer": 3, "accuracy": 0.254, "rmse": 1.28},
                                                "lowest_rmse": {"answer": 3, "accuracy": 0.254, "rmse": 1.28}},
                  "per_class": {"1": {"support": 41, "accuracy": 0.561}, "3": {"support": 0, "accuracy": None},
                                "5": {"support": 63, "accuracy": 0.349}},
                  "debugger_rules": {"verdicts": [{"rule": "Overfit", "status": "IssuesFound"}]}}
    state = {"id": "r1", "status": "Succeeded", "profile": "local",
             "steps": {"Evaluate": {"outputs": {"evaluation": "out/evaluation"},
                                    "properties": {"EvaluationReport": evaluation}}}}
    assert "evaluation report" not in summarize(state, tmp_path)  # not written: not linked
    report = tmp_path / "Evaluate" / "out" / "evaluation" / "report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html></html>")
    text = summarize(state, tmp_path)
    assert f"evaluation report: {report.resolve().as_uri()}" in text and "debugger rules: Overfit IssuesFound" in text
    assert "a constant answer: always 3 scores accuracy 0.2540, always 3 RMSE 1.2800" in text
    assert "test accuracy per count  1: 0.561  3: -  5: 0.349" in text


@pytest.mark.slow
def test_the_previous_version_is_looked_up_in_the_registry(run, tmp_path, monkeypatch):
    """--model-package-group with the local runner's listing: the newest Approved version is the
    one compared with, in the page and in evaluation.json (Evaluate's main() in this process; the
    `report` fixture runs it as its container does)."""
    def evaluation(accuracy):
        return {"multiclass_classification_metrics": {"accuracy": {"value": accuracy}},
                "regression_metrics": {"rmse": {"value": 2.5}}}

    listing = tmp_path / "registry.json"
    listing.write_text(json.dumps({"group": "bin-count", "versions": [
        {"version": 1, "status": "Approved", "evaluation": evaluation(0.2)},
        {"version": 2, "status": "PendingManualApproval", "evaluation": evaluation(0.9)}]}))
    args = ["--model", run / "model.tar.gz", "--test", run / "test", "--corruptions", "none",
            "--model-package-group", "bin-count"]
    monkeypatch.setenv("INVMON_MODEL_REGISTRY", str(listing))
    done = run_main(evaluate_script.main, *args, "--output", tmp_path / "out", check=True)
    assert "compared with: bin-count 1, Approved" in done.stdout
    page = (tmp_path / "out" / "report.html").read_text()
    assert "previous version (1, Approved)" in page and "0.2000" in page and "2.5000" in page
    written = json.loads((tmp_path / "out" / "evaluation.json").read_text())["previous_version"]
    # This listing names no artifact, so version 1 is not scored on these photos (tests/test_champion.py
    # scores one that has).
    assert written == {"group": "bin-count", "version": 1, "status": "Approved",
                       "recorded_metrics": {"accuracy": 0.2, "rmse": 2.5},
                       "note": "version 1 (Approved) was not scored on these photos: the registry records no "
                               "artifact for it"}

    listing.write_text(json.dumps({"group": "bin-count", "versions": []}))  # the first version ever
    run_main(evaluate_script.main, *args, "--output", tmp_path / "first", check=True)
    page = (tmp_path / "first" / "report.html").read_text()
    assert "No previous registered version to compare with: no version of bin-count is registered yet" in page


@pytest.mark.slow
def test_the_learning_rate_the_debugger_recorded_is_plotted_and_listed(run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    rates = [[0, 0.01], [2, 0.02], [4, 0.005]]
    (model / "debugger.json").write_text(json.dumps({
        "status": "recorded", "smdebug": "1.0.34", "losses": {"train": [[0, 1.6], [1, 1.5], [2, 1.4]]},
        "learning_rate": rates, "gradients": {}, "tensors": {}}))
    page = report_of(model, run / "test", tmp_path / "out")
    assert '<img class="plot" src="data:image/png;base64,' in page and 'alt="learning rate"' in page
    assert "Learning rate: step 0: 0.01, step 2: 0.02, step 4: 0.005" in page
