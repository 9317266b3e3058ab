"""Train: the training script with the best trial's hyperparameters; checkpoints each epoch."""
from steps.base import Code, MetricDefinition, Param, StepOutput, TrainingStep, TunedValue

CODE = Code("train", "train.py", extra_files=("inference/inference.py", "inference/photos.py"))

# The lines train.py prints every epoch, read by SageMaker and the local tuner alike.
METRICS = (
    MetricDefinition("train:loss", r"train:loss=([0-9.]+)"),
    MetricDefinition("validation:loss", r"validation:loss=([0-9.]+)"),
    MetricDefinition("validation:accuracy", r"validation:accuracy=([0-9.]+)"),
    MetricDefinition("validation:rmse", r"validation:rmse=([0-9.]+)"),
)

CHANNELS = (
    ("train", StepOutput("Preprocess", "train")),
    ("validation", StepOutput("Preprocess", "validation")),
)

COMMON_HYPERPARAMETERS = (
    ("arch", Param("Arch")),
    ("image_size", Param("ImageSize")),
    ("seed", Param("Seed")),
    ("pretrained", "auto"),
    ("freeze_backbone", Param("FreezeBackbone")),
    ("frozen_blocks", Param("FrozenBlocks")),
    ("backbone_lr", Param("BackboneLr")),
    ("head_warmup_epochs", Param("HeadWarmupEpochs")),
    ("optimizer", Param("Optimizer")),
    ("mixup", Param("Mixup")),
    ("decode", Param("Decode")),
    ("tta", Param("TestTimeAugmentation")),
    ("keep_epoch", Param("KeepEpoch")),
)

# SageMaker Debugger on the Train step, with EnableDebugger=true only (pipeline/sagemaker/definition.py;
# the job then runs in steps/images.py's train-debugger container, which installs smdebug): the hook's
# collections and the built-in rules, with their built-in default parameters. scripts/train/debugger.py
# records the same collections where smdebug is installed, and scripts/evaluate/rules.py computes the
# same four verdicts on every run, from the Debugger's data or from history.json's per-epoch losses.
DEBUGGER_COLLECTIONS = (("losses", 1), ("gradients", 50), ("weights", 50), ("biases", 50))  # save_interval
DEBUGGER_RULES = (
    ("LossNotDecreasing", {"mode": "TRAIN"}),  # as smdebug_rulesconfig's loss_not_decreasing()
    ("Overfit", {}),
    ("VanishingGradient", {}),
    ("ExplodingTensor", {}),
)

STEP = TrainingStep(
    name="Train",
    description="Train on the whole training split with the best trial's hyperparameters.",
    code=CODE,
    channels=CHANNELS,
    hyperparameters=(
        *COMMON_HYPERPARAMETERS,
        ("epochs", Param("Epochs")),
        ("tails", Param("Tails")),  # trials train one tail: they rank learning rates
        ("refit", Param("Refit")),  # and on the training split alone
        ("recall_floor", Param("RecallFloor")),  # and on the plain rounding
        ("lr", TunedValue("Tune", "lr")),
        ("batch_size", TunedValue("Tune", "batch_size")),
    ),
    metric_definitions=METRICS,
    checkpoints=True,
)
