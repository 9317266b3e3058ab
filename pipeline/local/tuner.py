"""The local hyperparameter tuner: SageMaker's tuning job semantics on this machine.

- Search: `Bayesian` (a Gaussian process over the unit-scaled ranges with expected improvement,
  after a few random starts) or `Random`.
- Objective: the last value the trial printed for the objective metric, read from its log by
  the declared regex (as SageMaker does).
- Early stopping (`Auto`): the median stopping rule. From its second report on, a trial whose
  best value so far is worse than the median of finished trials at the same report is stopped. A trial
  reports once per epoch, so one-epoch trials run to the end.
"""
from __future__ import annotations

import math
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from steps.base import ContinuousRange, TuningStep

RANDOM_STARTS = 2
CANDIDATES = 2048
MIN_TRIALS_FOR_STOPPING = 2


class SearchSpace:
    """Maps points to the unit cube: log or linear for continuous ranges, rank for categorical."""

    def __init__(self, ranges):
        self.ranges = list(ranges)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.random((n, len(self.ranges)))

    def decode(self, u: np.ndarray) -> dict[str, str]:
        point = {}
        for r, x in zip(self.ranges, u):
            if isinstance(r, ContinuousRange):
                if r.scaling == "Logarithmic":
                    lo, hi = math.log(r.min_value), math.log(r.max_value)
                    value = math.exp(lo + x * (hi - lo))
                else:
                    value = r.min_value + x * (r.max_value - r.min_value)
                point[r.name] = f"{value:.6g}"
            else:
                point[r.name] = r.values[min(int(x * len(r.values)), len(r.values) - 1)]
        return point

    def encode(self, point: dict[str, str]) -> np.ndarray:
        u = []
        for r in self.ranges:
            if isinstance(r, ContinuousRange):
                value = float(point[r.name])
                if r.scaling == "Logarithmic":
                    lo, hi = math.log(r.min_value), math.log(r.max_value)
                    u.append((math.log(value) - lo) / (hi - lo))
                else:
                    u.append((value - r.min_value) / (r.max_value - r.min_value))
            else:  # the middle of the category's slot
                u.append((r.values.index(point[r.name]) + 0.5) / len(r.values))
        return np.array(u)


def expected_improvement(x_seen: np.ndarray, y_seen: np.ndarray, candidates: np.ndarray,
                         length_scale: float = 0.25, noise: float = 1e-3) -> np.ndarray:
    """EI (maximisation) under a Matern-5/2 Gaussian process fitted to standardised values."""

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)) / length_scale
        return (1 + math.sqrt(5) * d + 5 / 3 * d ** 2) * np.exp(-math.sqrt(5) * d)

    mean, std = y_seen.mean(), y_seen.std() or 1.0
    y = (y_seen - mean) / std
    k = kernel(x_seen, x_seen) + noise * np.eye(len(x_seen))
    chol = np.linalg.cholesky(k)
    alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y))
    k_star = kernel(candidates, x_seen)
    mu = k_star @ alpha
    v = np.linalg.solve(chol, k_star.T)
    sigma = np.sqrt(np.clip(1.0 - (v ** 2).sum(0), 1e-12, None))
    best = y.max()
    z = (mu - best) / sigma
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    pdf = np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    return (mu - best) * cdf + sigma * pdf


@dataclass
class Trial:
    index: int
    hyperparameters: dict[str, str]
    status: str = "Pending"  # Completed | Stopped | Failed
    objective: float | None = None
    reports: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""


class Tuner:
    def __init__(self, step: TuningStep, max_jobs: int, max_parallel: int, seed: int = 0,
                 log: Callable[[str], None] = print):
        if max_jobs < 1 or max_parallel < 1:
            raise ValueError("TuningMaxJobs and TuningMaxParallelJobs must be at least 1")
        self.step = step
        self.space = SearchSpace(step.ranges)
        self.max_jobs = max_jobs
        self.max_parallel = min(max_parallel, max_jobs)
        self.rng = np.random.default_rng(seed)
        self.sign = 1.0 if step.objective_type == "Maximize" else -1.0
        self.trials: list[Trial] = []
        self.log = log

    # -- search ------------------------------------------------------------------------------
    def suggest(self) -> dict[str, str]:
        scored = [t for t in self.trials if t.objective is not None]
        if self.step.strategy != "Bayesian" or len(scored) < RANDOM_STARTS:
            return self.space.decode(self.space.sample(self.rng, 1)[0])
        x = np.stack([self.space.encode(t.hyperparameters) for t in scored])
        y = self.sign * np.array([t.objective for t in scored])
        candidates = self.space.sample(self.rng, CANDIDATES)
        # Trials still running count as if they scored the mean, so parallel picks spread out.
        pending = [t for t in self.trials if t.status == "Pending"]
        if pending:
            x = np.vstack([x, *[self.space.encode(t.hyperparameters) for t in pending]])
            y = np.concatenate([y, np.full(len(pending), y.mean())])
        ei = expected_improvement(x, y, candidates)
        return self.space.decode(candidates[int(np.argmax(ei))])

    # -- early stopping ----------------------------------------------------------------------
    def should_stop(self, reports: list[float]) -> bool:
        if self.step.early_stopping != "Auto":
            return False
        k = len(reports) - 1
        if k < 1:  # a first epoch from scratch is mostly noise: judge from the second report on
            return False
        # Compare with finished trials that went on past this report: a trial's last report
        # (e.g. the only one of a one-epoch trial) is never a reason to stop it.
        finished = [t.reports[k] for t in self.trials
                    if t.status in ("Completed", "Stopped") and len(t.reports) > k + 1]
        if len(finished) < MIN_TRIALS_FOR_STOPPING:
            return False
        best_so_far = max(self.sign * r for r in reports)
        return best_so_far < float(np.median([self.sign * r for r in finished]))

    # -- the loop ----------------------------------------------------------------------------
    def run(self, run_trial: Callable[[Trial, Callable[[dict], bool]], "object"]) -> Trial:
        """Run every trial; `run_trial(trial, should_stop)` runs one job and returns its JobResult."""
        objective = self.step.objective_metric

        def one(trial: Trial) -> Trial:
            def stop(seen: dict[str, list[float]]) -> bool:
                return objective in seen and self.should_stop(seen[objective])

            try:
                result = run_trial(trial, stop)
            except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, the search goes on
                trial.status, trial.error = "Failed", str(exc).splitlines()[0]
                return trial
            trial.seconds = result.seconds
            trial.reports = result.metrics.get(objective, [])
            if not trial.reports:
                trial.status, trial.error = "Failed", f"no {objective} line matched in the log"
            else:
                trial.objective = trial.reports[-1]
                trial.status = "Stopped" if result.stopped_early else "Completed"
            return trial

        with ThreadPoolExecutor(self.max_parallel) as pool:
            running = set()
            while len(self.trials) < self.max_jobs or running:
                while len(self.trials) < self.max_jobs and len(running) < self.max_parallel:
                    trial = Trial(len(self.trials) + 1, self.suggest())
                    self.trials.append(trial)
                    running.add(pool.submit(one, trial))
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    t = future.result()
                    shown = "-" if t.objective is None else f"{t.objective:.4f}"
                    self.log(f"trial {t.index}/{self.max_jobs} {t.status}: {objective}={shown} "
                             f"{t.hyperparameters} ({t.seconds:.0f}s){' ' + t.error if t.error else ''}")
        return self.best()

    def best(self) -> Trial:
        scored = [t for t in self.trials if t.objective is not None]
        if not scored:
            errors = "; ".join(f"trial {t.index}: {t.error}" for t in self.trials)
            raise RuntimeError(f"no tuning trial produced {self.step.objective_metric}: {errors}")
        return max(scored, key=lambda t: self.sign * t.objective)

    def summary(self) -> dict:
        best = self.best()
        return {
            "objective": {"MetricName": self.step.objective_metric, "Type": self.step.objective_type},
            "strategy": self.step.strategy,
            "early_stopping": self.step.early_stopping,
            "best_trial": best.index,
            "best_objective": best.objective,
            "TunedHyperParameters": best.hyperparameters,
            "trials": [asdict(t) for t in self.trials],
        }
