"""The local tuner: Bayesian search, objective read by the declared regex, early stopping."""
from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest

from pipeline.local.runner import LocalRun
from pipeline.local.tuner import SearchSpace, Tuner, expected_improvement
from steps.base import (CategoricalRange, Code, ContinuousRange, Dag, MetricDefinition, Param,
                        PROCESSING_BASE, ProcessingOutput, ProcessingStep, StepOutput, TrainingStep,
                        TunedValue, TuningStep)

# Accuracy peaks at lr = 0.01 and batch_size = 64; epochs report a rising curve toward it.
TRIAL_SCRIPT = """
import argparse, math, os, pathlib, time
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float); p.add_argument("--batch_size"); p.add_argument("--epochs", type=int)
p.add_argument("--checkpoint_dir")
a = p.parse_args()
assert (pathlib.Path(os.environ["SM_CHANNEL_TRAIN"]) / "ok").exists()
best = 0.9 - 0.3 * abs(math.log10(a.lr) + 2) - (0.05 if a.batch_size != "64" else 0)
for epoch in range(1, a.epochs + 1):
    print(f"epoch={epoch} train:loss=1.0 validation:accuracy={best * epoch / a.epochs:.4f}", flush=True)
    time.sleep(0.05)
(pathlib.Path(os.environ["SM_MODEL_DIR"]) / "done").write_text("1")
"""

DATA_SCRIPT = """
import pathlib, sys
out = pathlib.Path(sys.argv[sys.argv.index("--output") + 1]); (out / "train").mkdir(exist_ok=True)
(out / "train" / "ok").write_text("1")
"""


def tuning_dag(root, epochs: int, early_stopping: str) -> Dag:
    for folder, source in (("data", DATA_SCRIPT), ("trial", TRIAL_SCRIPT)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "main.py").write_text(textwrap.dedent(source))
    metrics = (MetricDefinition("validation:accuracy", r"validation:accuracy=([0-9.]+)"),)
    channels = (("train", StepOutput("Data", "train")),)
    trial = TrainingStep("Trial", Code("trial", "main.py", root=root), channels,
                         hyperparameters=(("epochs", epochs),), metric_definitions=metrics)
    return Dag((
        ProcessingStep("Data", Code("data", "main.py", root=root), inputs=(),
                       outputs=(ProcessingOutput("train", f"{PROCESSING_BASE}/output/train"),),
                       arguments=("--output", f"{PROCESSING_BASE}/output")),
        TuningStep("Tune", trial,
                   ranges=(ContinuousRange("lr", 0.001, 0.1), CategoricalRange("batch_size", ("32", "64", "128"))),
                   objective_metric="validation:accuracy", objective_type="Maximize",
                   max_jobs=Param("MaxJobs"), max_parallel_jobs=1, early_stopping=early_stopping),
        TrainingStep("Train", Code("trial", "main.py", root=root), channels,
                     hyperparameters=(("epochs", 1), ("lr", TunedValue("Tune", "lr")),
                                      ("batch_size", TunedValue("Tune", "batch_size"))),
                     metric_definitions=metrics),
    ))


def run(tmp_path, home, dag, max_jobs):
    return LocalRun.create(home, dag, {"MaxJobs": max_jobs, "Seed": 3}, "test", echo=lambda l: None).execute()


def test_tuning_reads_objective_from_log_and_wires_best_into_training(tmp_path, invmon_home):
    # Early stopping is on, but one-epoch trials report once: none may be stopped at its end.
    state = run(tmp_path, invmon_home, tuning_dag(tmp_path / "scripts", 1, "Auto"), 8)
    assert state["status"] == "Succeeded", state["failure"]
    summary = json.loads((invmon_home / "runs" / state["id"] / "Tune" / "tuning.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 8 and all(t["status"] == "Completed" for t in trials)
    for t in trials:  # the objective is what the script printed for these hyperparameters
        lr, bs = float(t["hyperparameters"]["lr"]), t["hyperparameters"]["batch_size"]
        expected = 0.9 - 0.3 * abs(math.log10(lr) + 2) - (0.05 if bs != "64" else 0)
        assert t["objective"] == pytest.approx(expected, abs=1e-4)
    best = max(trials, key=lambda t: t["objective"])
    assert summary["TunedHyperParameters"] == best["hyperparameters"]
    assert state["steps"]["Train"]["properties"]["HyperParameters"]["lr"] == best["hyperparameters"]["lr"]
    assert state["steps"]["Train"]["properties"]["HyperParameters"]["batch_size"] == best["hyperparameters"]["batch_size"]
    # Bayesian search after two random starts should get close to the optimum (lr 0.01).
    assert best["objective"] > 0.75


def test_early_stopping_stops_trials_below_the_median(tmp_path, invmon_home):
    state = run(tmp_path, invmon_home, tuning_dag(tmp_path / "scripts", 4, "Auto"), 8)
    assert state["status"] == "Succeeded", state["failure"]
    trials = json.loads((invmon_home / "runs" / state["id"] / "Tune" / "tuning.json").read_text())["trials"]
    stopped = [t for t in trials if t["status"] == "Stopped"]
    assert stopped, "some trials below the running median should have been stopped"
    assert all(len(t["reports"]) < 4 for t in stopped)
    assert all(len(t["reports"]) == 4 for t in trials if t["status"] == "Completed")


def test_search_space_round_trips_and_respects_ranges():
    space = SearchSpace((ContinuousRange("lr", 0.001, 0.1), CategoricalRange("batch_size", ("32", "64"))))
    rng = np.random.default_rng(0)
    for u in space.sample(rng, 200):
        point = space.decode(u)
        assert 0.001 <= float(point["lr"]) <= 0.1
        assert point["batch_size"] in ("32", "64")
        assert space.decode(space.encode(point)) == point


def test_expected_improvement_prefers_unexplored_promising_points():
    x = np.array([[0.1], [0.5], [0.9]])
    y = np.array([0.2, 0.8, 0.3])
    candidates = np.array([[0.5], [0.55], [0.95]])
    ei = expected_improvement(x, y, candidates)
    assert ei[1] > ei[2]  # near the best observation beats near a bad one
    assert ei[0] < ei[1]  # re-sampling the best point gains little


def test_tuner_rejects_impossible_budgets():
    with pytest.raises(ValueError, match="at least 1"):
        Tuner(TuningStep("T", None, (), "m", "Maximize", 1, 1), max_jobs=0, max_parallel=1)
