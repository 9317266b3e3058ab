"""Tune: short trials of the training script over learning rate and batch size."""
from steps.base import CategoricalRange, ContinuousRange, Param, TrainingStep, TuningStep
from steps.train import CHANNELS, CODE, COMMON_HYPERPARAMETERS, METRICS

TRIAL = TrainingStep(
    name="TuneTrial",
    description="One tuning trial: a fraction of the training split for a short run.",
    code=CODE,
    channels=CHANNELS,
    hyperparameters=(
        *COMMON_HYPERPARAMETERS,
        ("epochs", Param("TrialEpochs")),
        ("data_fraction", Param("TrialDataFraction")),
    ),
    metric_definitions=METRICS,
    checkpoints=False,
)

STEP = TuningStep(
    name="Tune",
    description="Bayesian search over lr and batch size; objective validation accuracy.",
    training=TRIAL,
    ranges=(
        ContinuousRange("lr", Param("TuneLrMin"), Param("TuneLrMax"), scaling="Logarithmic"),
        CategoricalRange("batch_size", ("32", "64", "128", "256", "512")),
    ),
    objective_metric="validation:accuracy",
    objective_type="Maximize",
    max_jobs=Param("TuningMaxJobs"),
    max_parallel_jobs=Param("TuningMaxParallelJobs"),
    strategy="Bayesian",
    early_stopping="Auto",
    cache=True,
)
