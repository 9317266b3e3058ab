"""Profiles: named sets of parameter defaults.

`full` is the reference recipe (ResNet-50 at 224 px, 20 one-epoch trials on 10% of the data).
`local` keeps `make run` within its time goal on 2 CPU cores: a ResNet-18 at 96 px, 5 short
trials, 15 epochs, and a gate set for the embedded synthetic data.
"""
from __future__ import annotations

from pipeline.parameters import BY_NAME, PARAMETERS

FULL: dict[str, object] = {p.name: p.default for p in PARAMETERS}

LOCAL: dict[str, object] = {
    **FULL,
    "InputDataUrl": "",  # empty: the runner generates the embedded synthetic data
    "ManifestUrl": "",
    "Arch": "resnet18",
    "ImageSize": 96,
    "ResizeShortSide": 112,
    # Trained from scratch, a one-epoch trial on a few hundred photos scores at chance whatever
    # its hyperparameters; three epochs on 60% of the split separate good settings from bad.
    "TuningMaxJobs": 5,
    "TuningMaxParallelJobs": 1,  # 2 cores: parallel trials only fight over them
    "TrialDataFraction": 0.6,
    "TrialEpochs": 3,
    "Epochs": 15,
    # 2.5x chance (0.2) on the synthetic test split; the full profile's 0.3 is for real ABID.
    "AccuracyThreshold": 0.5,
}

PROFILES = {"local": LOCAL, "full": FULL}


def defaults(profile: str) -> dict[str, object]:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    values = dict(PROFILES[profile])
    assert set(values) == set(BY_NAME), "a profile must set exactly the declared parameters"
    return values
