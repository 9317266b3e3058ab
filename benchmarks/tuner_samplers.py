"""Which Bayesian sampler finds a good lr / batch size faster: Optuna's TPE or GP, next to random.

    python benchmarks/tuner_samplers.py [--seeds 20] [--budgets 5 20] [--noise 0.01]

The local tuner (pipeline/local/tuner.py, the same Tuner the runner uses) searches the declared
Tune ranges (lr 0.001-0.1 log, batch size 32-512) of a cheap synthetic objective shaped like a
one-epoch trial's validation accuracy: best 0.9 at lr 0.01 and batch size 64, falling off
quadratically in log10(lr) and by a fixed amount per batch size, plus Gaussian noise (a trial's
accuracy is noisy). For each sampler and trial budget, over seeds 0..N-1, it reports the median
regret (0.9 minus the best true accuracy found), how often the best trial is within 0.02 of the
optimum, and the median wall time of one study (the sampler's own cost: no job runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from types import SimpleNamespace

from pipeline.dag.parameters import BY_NAME
from pipeline.local.tuner import Tuner
from steps.base import ContinuousRange, Param, TuningStep
from steps.tune import STEP

OPTIMUM = 0.9
BATCH_PENALTY = {"32": 0.03, "64": 0.0, "128": 0.02, "256": 0.05, "512": 0.08}


def accuracy(lr: float, batch_size: str) -> float:
    return OPTIMUM - 0.15 * (math.log10(lr) + 2) ** 2 - BATCH_PENALTY[batch_size]


def declared_ranges() -> tuple:
    """The Tune step's ranges, a bound that is a pipeline parameter at that parameter's default."""
    def value(bound):
        return float(BY_NAME[bound.name].default) if isinstance(bound, Param) else bound

    return tuple(dataclasses.replace(r, min_value=value(r.min_value), max_value=value(r.max_value))
                 if isinstance(r, ContinuousRange) else r for r in STEP.ranges)


def study(strategy: str, bayesian: str, seed: int, budget: int, noise: float) -> tuple[float, float]:
    import random

    rng = random.Random(10_000 + seed)
    step = TuningStep("Tune", None, declared_ranges(), "acc", "Maximize", budget, 1,
                      strategy=strategy, early_stopping="Off")
    tuner = Tuner(step, budget, 1, seed=seed, log=lambda m: None, bayesian=bayesian)
    truth = {}

    def run_trial(trial, should_stop):
        hp = trial.hyperparameters
        true = accuracy(float(hp["lr"]), hp["batch_size"])
        truth[trial.index] = true
        return SimpleNamespace(seconds=0.0, metrics={"acc": [true + rng.gauss(0, noise)]},
                               stopped_early=False)

    started = time.perf_counter()
    best = tuner.run(run_trial)
    return OPTIMUM - truth[best.index], time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--budgets", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--samplers", nargs="+", default=["Random", "tpe", "gp"])
    args = ap.parse_args()
    print(f"{'sampler':8} {'trials':>6} {'median regret':>13} {'within 0.02':>11} {'s/study':>8}")
    for budget in args.budgets:
        for name in args.samplers:
            strategy, bayesian = ("Random", "tpe") if name == "Random" else ("Bayesian", name)
            runs = [study(strategy, bayesian, seed, budget, args.noise) for seed in range(args.seeds)]
            regrets = [r for r, _ in runs]
            hits = sum(r <= 0.02 for r in regrets)
            print(f"{name:8} {budget:6d} {statistics.median(regrets):13.4f} "
                  f"{hits:5d}/{args.seeds:<5d} {statistics.median(t for _, t in runs):8.2f}", flush=True)


if __name__ == "__main__":
    main()
