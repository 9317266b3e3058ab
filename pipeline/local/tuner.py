"""The local hyperparameter tuner: SageMaker's tuning job semantics on Optuna.

Driven by the tuning step's declaration (the tuning job config):
- Search (`Strategy`): `Bayesian` -> Optuna's GPSampler (a Gaussian process with log expected
  improvement, after a few random starts), `Random` -> its RandomSampler, both seeded by the
  run's Seed. `Grid` and `Hyperband` are refused with a clear message. GP, not TPE: on the Tune
  ranges with 5-20 trials, TPE did no better than random search while the GP found lr and batch
  size much sooner (benchmarks/tuner_samplers.py); its cost, under a second a trial, is nothing
  next to a training job.
- Ranges: a ContinuousRange is `suggest_float` (log scale for `Logarithmic`, and for `Auto` when
  the range spans at least a decade of positive values), a CategoricalRange `suggest_categorical`
  over its strings. Values reach the script as strings, continuous ones as `%.6g`.
- `MaxParallelTrainingJobs` trials run at once (ask/tell from a thread pool).
- Objective: the last value the trial printed for the objective metric, read from its log by
  the declared regex (as SageMaker does).
- Early stopping `Auto`: Optuna's median pruner. Every objective line is reported as one step;
  from its second report on, a trial whose best value so far is worse than the median of
  earlier trials at the same step (stopped ones included, as SageMaker's median rule does) is
  stopped. A stopped trial's last value is told to the sampler as its result, so the search
  learns from it. A report is judged only against trials that ran
  past it, so a trial is never stopped on its final report (a one-epoch trial always finishes).
  `Off`: no pruning.
"""
from __future__ import annotations

import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from pipeline.digests import sha256_of
from steps.base import CategoricalRange, ContinuousRange, TuningStep

# The sampler behind `Bayesian`: "gp" or "tpe" (benchmarks/tuner_samplers.py measures both).
BAYESIAN = "gp"
STRATEGIES = ("Bayesian", "Random")
REFUSED = {
    "Grid": "Grid search is not run locally: use Bayesian or Random",
    "Hyperband": "Hyperband is not run locally: use Bayesian or Random with early stopping Auto",
}
MIN_TRIALS_FOR_STOPPING = 2  # completed trials before the median pruner may stop anything
TUNER_CODE = Path(__file__)  # hashed into the Tune step's cache key


def startup_trials(max_jobs: int) -> int:
    """Random trials before the model-based search: a quarter of the budget, 2 to 10."""
    return min(10, max(2, max_jobs // 4))


def make_sampler(strategy: str, seed: int, max_jobs: int, parallel: bool = False,
                 bayesian: str = BAYESIAN) -> optuna.samplers.BaseSampler:
    if strategy in REFUSED:
        raise ValueError(f"tuning strategy {strategy!r}: {REFUSED[strategy]}")
    if strategy == "Random":
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy != "Bayesian":
        raise ValueError(f"unknown tuning strategy {strategy!r} (expected one of {STRATEGIES})")
    startup = startup_trials(max_jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if bayesian == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        # constant_liar: running trials count as poor results, so parallel picks spread out.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                          constant_liar=parallel)


def log_scale(r: ContinuousRange) -> bool:
    if r.scaling == "Logarithmic":
        if r.min_value <= 0:
            raise ValueError(f"range {r.name}: Logarithmic scaling needs a positive minimum")
        return True
    if r.scaling == "Linear":
        return False
    if r.scaling == "Auto":
        return r.min_value > 0 and r.max_value / r.min_value >= 10
    raise ValueError(f"range {r.name}: scaling {r.scaling!r} is not run locally "
                     "(use Auto, Linear or Logarithmic)")


def suggest(trial: optuna.Trial, ranges) -> dict[str, str]:
    """The trial's hyperparameters, as the strings the training script receives."""
    point = {}
    for r in ranges:
        if isinstance(r, ContinuousRange):
            value = trial.suggest_float(r.name, r.min_value, r.max_value, log=log_scale(r))
            point[r.name] = f"{value:.6g}"
        elif isinstance(r, CategoricalRange):
            point[r.name] = str(trial.suggest_categorical(r.name, [str(v) for v in r.values]))
        else:
            raise TypeError(f"unsupported hyperparameter range {r!r}")
    return point


STOPPED = "stopped_early"  # user attribute of a trial the rule stopped (told to the study as complete)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran to their end: complete and not stopped early."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get(STOPPED)]


def failure_line(exc: Exception) -> str:
    """One line for a failed trial: the job's own first line, and the last line of the log tail
    it carries (where the script said what went wrong)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


class MedianStoppingRule(optuna.pruners.BasePruner):
    """Optuna's MedianPruner (judging from the second report on), asked only when some completed
    trial ran past this report: a trial's last report is never a reason to stop it."""

    def __init__(self, n_startup_trials: int = MIN_TRIALS_FOR_STOPPING):
        self.n_startup_trials = n_startup_trials
        self.median = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=1)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        completed = finished(study)
        if len(completed) < self.n_startup_trials:
            return False
        if not any(t.last_step is not None and t.last_step > step for t in completed):
            return False
        return self.median.prune(study, trial)


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
                 log: Callable[[str], None] = print, bayesian: str = BAYESIAN):
        if max_jobs < 1 or max_parallel < 1:
            raise ValueError("TuningMaxJobs and TuningMaxParallelJobs must be at least 1")
        if step.early_stopping not in ("Auto", "Off"):
            raise ValueError(f"early stopping {step.early_stopping!r}: expected Auto or Off")
        for r in step.ranges:  # refuse a bad range before any trial runs
            if isinstance(r, ContinuousRange):
                if not r.min_value < r.max_value:
                    raise ValueError(f"range {r.name}: the minimum {r.min_value:g} must be below the maximum "
                                     f"{r.max_value:g}")
                log_scale(r)
        self.step = step
        self.max_jobs = max_jobs
        self.max_parallel = min(max_parallel, max_jobs)
        self.sampler = make_sampler(step.strategy, seed, max_jobs, self.max_parallel > 1, bayesian)
        self.pruner = MedianStoppingRule() if step.early_stopping == "Auto" else optuna.pruners.NopPruner()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            direction="maximize" if step.objective_type == "Maximize" else "minimize",
            sampler=self.sampler, pruner=self.pruner)
        self.sign = 1.0 if step.objective_type == "Maximize" else -1.0
        self.trials: list[Trial] = []
        self.log = log

    @staticmethod
    def fingerprint() -> str:
        """What the Tune step's cache key knows of the tuner: this file's bytes, Optuna's version."""
        return sha256_of([TUNER_CODE.read_bytes(), f"\0optuna {optuna.__version__}".encode()])

    # -- the loop ----------------------------------------------------------------------------
    def run(self, run_trial: Callable[[Trial, Callable[[dict], bool]], "object"]) -> Trial:
        """Run every trial; `run_trial(trial, should_stop)` runs one job and returns its JobResult.

        `should_stop(metrics_so_far)` reports each new objective value to Optuna and says whether
        the pruner stops the job."""
        objective = self.step.objective_metric

        def one(trial: Trial, handle: optuna.Trial) -> Trial:
            reported = 0

            def stop(seen: dict[str, list[float]]) -> bool:
                nonlocal reported
                values = seen.get(objective, [])
                if len(values) == reported:  # another metric's line: nothing new to judge
                    return False
                for step in range(reported, len(values)):
                    handle.report(values[step], step)
                reported = len(values)
                return handle.should_prune()

            try:
                result = run_trial(trial, stop)
            except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, the search goes on
                trial.status, trial.error = "Failed", failure_line(exc)
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
            running = {}
            while len(self.trials) < self.max_jobs or running:
                while len(self.trials) < self.max_jobs and len(running) < self.max_parallel:
                    handle = self.study.ask()
                    trial = Trial(len(self.trials) + 1, suggest(handle, self.step.ranges))
                    self.trials.append(trial)
                    running[pool.submit(one, trial, handle)] = handle
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    handle = running.pop(future)
                    t = future.result()
                    self._tell(handle, t)
                    shown = "-" if t.objective is None else f"{t.objective:.4f}"
                    self.log(f"trial {t.index}/{self.max_jobs} {t.status}: {objective}={shown} "
                             f"{t.hyperparameters} ({t.seconds:.0f}s){' ' + t.error if t.error else ''}")
        return self.best()

    def _tell(self, handle: optuna.Trial, t: Trial) -> None:
        if t.status == "Completed":
            self.study.tell(handle, t.objective)
        elif t.status == "Stopped":
            # Told as a result (its last value), not as pruned: GPSampler learns only from complete
            # trials, and a bad region it never heard of it proposes again (the real profile ran
            # lr 0.1 three times). The stopping rule still counts only trials that ran to the end.
            handle.set_user_attr(STOPPED, True)
            self.study.tell(handle, t.objective)
        else:
            self.study.tell(handle, state=TrialState.FAIL)

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
            "sampler": f"optuna {optuna.__version__} {type(self.sampler).__name__}",
            "early_stopping": self.step.early_stopping,
            "best_trial": best.index,
            "best_objective": best.objective,
            "TunedHyperParameters": best.hyperparameters,
            "trials": [asdict(t) for t in self.trials],
        }
