"""Model artifacts as each profile's recipe makes them, trained tiny and fast.

train.py runs as the Train step runs it (a subprocess, its code staged as the container stages
it, the SM_* environment), with the Train step's hyperparameters taken from the profile's own
defaults (steps/train.py STEP, pipeline/dag/profiles.py): the same arch, head, frozen blocks, tails,
decoding and TTA, so the artifact holds what that profile's artifact holds. Only the sizes are
cut: 64 px photos of squares, 2 epochs, a fixed lr and batch size where the tuner would choose.
Trained once per test process, packed as SageMaker packs SM_MODEL_DIR.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.dag import profiles
from pipeline.local.jobs import tar_model
from steps.base import Param, TunedValue, stage_source
from steps.train import CODE, STEP
from test_train import run_train, write_split

SMALL = {"image_size": "64", "epochs": "2", "lr": "0.01", "batch_size": "8"}
_trained: dict[str, Path] = {}


def recipe(profile: str) -> list[str]:
    """train.py's arguments for `profile`'s Train step, with the sizes of SMALL."""
    defaults = profiles.defaults(profile)
    args = []
    for name, value in STEP.hyperparameters:
        if name in SMALL:  # the sizes, and the tuner's choices (TunedValue)
            value = SMALL[name]
        elif isinstance(value, Param):
            value = defaults[value.name]
        assert not isinstance(value, (Param, TunedValue)), (name, value)
        args += [f"--{name}", str(value)]
    return args + ["--checkpoint_dir", "none"]


def profile_artifact(profile: str, tmp_path_factory) -> Path:
    """model.tar.gz trained with `profile`'s recipe (once per process)."""
    if profile not in _trained:
        root = tmp_path_factory.mktemp(f"artifact-{profile}")
        if "data" not in _trained:
            data = tmp_path_factory.mktemp("squares")
            write_split(data / "train", 6, seed=1)
            write_split(data / "validation", 3, seed=2)
            _trained["data"] = data
        data = _trained["data"]
        code = stage_source(CODE, root / "code")
        run_train(root, {"train": data / "train", "validation": data / "validation"}, *recipe(profile),
                  script=code / CODE.entry_point,
                  env={"TRAINING_JOB_NAME": f"{profile}-tiny", "INVMON_FEATURE_CACHE": str(root / "cache")})
        _trained[profile] = tar_model(root / "model", root / "model.tar.gz")
    return _trained[profile]
