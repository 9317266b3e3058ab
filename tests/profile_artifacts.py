"""Model artifacts as each profile's recipe makes them, trained tiny and fast.

train.py runs as the Train step runs it (a subprocess, its code staged as the container stages
it, the SM_* environment), with the Train step's hyperparameters taken from the profile's own
defaults (steps/train.py STEP, pipeline/dag/profiles.py): the same arch, head, frozen blocks, tails,
decoding and TTA, so the artifact holds what that profile's artifact holds. Only the sizes are
cut: 64 px photos of squares, 2 epochs, a fixed lr and batch size where the tuner would choose.
Trained once per test run and shared by the parallel workers, packed as SageMaker packs SM_MODEL_DIR.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from conftest import locked, run_folder
from pipeline.dag import profiles
from pipeline.local.jobs import tar_model
from steps.base import Param, TunedValue, stage_source
from steps.train import CODE, STEP
from test_train import run_train, write_split

SMALL = {"image_size": "64", "epochs": "2", "lr": "0.01", "batch_size": "8"}


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
    """model.tar.gz trained with `profile`'s recipe, once per test run: the first worker to ask
    trains it, under a lock, and the parallel workers reuse it (several test files serve `real`)."""
    shared = run_folder(tmp_path_factory, "profile-artifacts")
    tarball = shared / profile / "model.tar.gz"
    with locked(shared / f"{profile}.lock"):
        if tarball.is_file():
            return tarball
        data = shared / "squares"
        with locked(shared / "squares.lock"):
            if not (data / ".written").is_file():
                write_split(data / "train", 6, seed=1)
                write_split(data / "validation", 3, seed=2)
                (data / ".written").touch()
        root = shared / profile
        shutil.rmtree(root, ignore_errors=True)  # what a worker that failed here left
        code = stage_source(CODE, root / "code")
        run_train(root, {"train": data / "train", "validation": data / "validation"}, *recipe(profile),
                  script=code / CODE.entry_point,
                  env={"TRAINING_JOB_NAME": f"{profile}-tiny", "INVMON_FEATURE_CACHE": str(root / "cache")})
        return tar_model(root / "model", tarball)
