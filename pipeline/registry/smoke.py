"""The staging smoke test's gate on production, written once for every way a version gets there:
`invmon models approve` (both back-ends) and, on SageMaker, `invmon deploy --stage prod`, a
rollback's fallback and the deploy function that a reviewer's approval in the console invokes.

A version may go to production when its smoke test passed and was recorded by the run or
execution that registered it (pipeline/registry/local.py, smoke_problem), or when an operator
recorded an override on it (`invmon models approve --force-no-smoke`): the SmokeTestOverride
property, saying who and why. The pipeline role may write the SmokeTest* verdict but never the
override (infra/invmon.yaml), so no run can let itself through.
"""
from __future__ import annotations

import re

from pipeline.registry.local import ModelVersion, RegistryError, smoke_problem

OVERRIDE_PROPERTY = "SmokeTestOverride"
# What a SageMaker CustomerMetadataProperties value may hold (letters, digits, spaces, _.:/=+-@),
# at most 256 characters; the local registry records the same text.
_NOT_ALLOWED = re.compile(r"[^\w .:/=+\-@]")
MAX_VALUE = 256


def production_problem(version: ModelVersion) -> str | None:
    """Why `version` may not go to production as far as its staging smoke test goes, or None:
    it passed (recorded by its own run), or an operator's override is recorded on it."""
    problem = smoke_problem(version)
    if problem is None or version.properties.get(OVERRIDE_PROPERTY, "").strip():
        return None
    return problem


def override_text(who: str, note: str, problem: str) -> str:
    """The override's record: who, why (the approval's note) and what it overrode."""
    text = f"by {who}: {note or 'no note'}: {problem}"
    return re.sub(r" +", " ", _NOT_ALLOWED.sub(" ", " ".join(text.split()))).strip()[:MAX_VALUE]


def operator(sm) -> str:
    """Who is overriding: the caller's identity (what CloudTrail records of the approval too)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.sagemaker.clients import client

    try:
        return client("sts", sm.meta.region_name).get_caller_identity()["Arn"]
    except (BotoCoreError, ClientError) as exc:
        raise RegistryError(f"the override was not recorded: who is approving could not be read ({exc})") from None


def record_override(sm, version: ModelVersion, text: str) -> None:
    """Record the override on the package before it is approved: the approval event is what
    deploys, and the deploy function reads the override then. (Locally the approval's note
    keeps it: no deploy path there is reached past `invmon models approve`.)"""
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.sagemaker.clients import describe_error

    try:
        sm.update_model_package(ModelPackageArn=version.arn, CustomerMetadataProperties={OVERRIDE_PROPERTY: text})
    except ClientError as exc:
        raise RegistryError(f"the override was not recorded on {version.name}: {describe_error(exc)}; "
                            "nothing was approved") from None
    except BotoCoreError as exc:
        raise RegistryError(f"the override was not recorded on {version.name}: {exc}; nothing was approved") from None
