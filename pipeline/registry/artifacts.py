"""Every deploy checks the artifact against the SHA-256 recorded at registration and refuses a
mismatch, naming both digests; a version with no digest recorded is refused too. The SageMaker
back-end hashes the S3 object (SageMakerTarget.registry_copy), the local one the registered file.
"""
from __future__ import annotations

import os

from pipeline.digests import file_sha256
from pipeline.registry.local import DIGEST_PROPERTY, ModelVersion
from pipeline.registry.stages import DeployError


def recorded_digest(model: ModelVersion) -> str:
    """The SHA-256 recorded at registration; a version without one cannot be deployed."""
    recorded = model.properties.get(DIGEST_PROPERTY, "")
    if not recorded:
        raise DeployError(f"refused: {model.name} has no {DIGEST_PROPERTY} recorded at registration, so "
                          f"its artifact cannot be verified; register it again (nothing was changed)")
    return recorded


def verify_artifact(model: ModelVersion, actual: str) -> None:
    """Refuse an artifact whose bytes are not those registered (nothing is changed)."""
    recorded = recorded_digest(model)
    if actual != recorded:
        raise DeployError(f"refused: the artifact of {model.name} is not the one registered: "
                          f"{model.artifact_uri} has SHA-256 {actual}, the registry recorded {recorded} "
                          f"(nothing was changed)")


def verify_local_artifact(model: ModelVersion) -> None:
    """The registered file, present and with the SHA-256 recorded at registration."""
    if not os.path.isfile(model.artifact_uri):
        raise DeployError(f"model artifact {model.artifact_uri} of {model.name} is missing")
    verify_artifact(model, file_sha256(model.artifact_uri))
