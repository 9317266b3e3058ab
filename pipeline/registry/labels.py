"""What a deploy labels its resources with, and what reads the labels back.

- Cost-allocation tags (activate them in Billing): what a job, model, endpoint config or endpoint
  costs, split by model group, stage and run. One definition for the deploys and for every
  request the compile stage makes (pipeline/dag/compile.py: the pipeline's jobs and staging
  Deploy). Clean-up deletes only what carries its group's and stage's tags.
- The flag tag on an endpoint that needs a person (`invmon endpoints` shows it).
- The Model's container environment names the package it serves and the digest of what it
  serves; clean-up and the monitor function read the package back from it.
"""
from __future__ import annotations

import re

GROUP_TAG, STAGE_TAG, RUN_TAG = "invmon:group", "invmon:stage", "invmon:run"
PIPELINE_STAGE = "pipeline"  # the stage tag of a run's jobs
PACKAGE_TAG = "invmon:model-package"
FLAG_TAG = "invmon:flag"
PACKAGE_ENV, DIGEST_ENV = "INVMON_MODEL_PACKAGE_ARN", "INVMON_ARTIFACT_SHA256"
PACKAGE_ARN = re.compile(r":model-package/(?P<group>[^/]+)/(?P<version>\d+)$")


def cost_tags(group, stage: str, run) -> list[dict]:
    """The tags of one resource; `group` and `run` may be pipeline placeholders. A run is named by
    its id: a local run's, or the last part of a pipeline execution's ARN (its execution id)."""
    if isinstance(run, str):
        run = run.rsplit("/", 1)[-1] or "unknown"
    tags = [{"Key": GROUP_TAG, "Value": group}] if group is not None else []
    return tags + [{"Key": STAGE_TAG, "Value": stage}, {"Key": RUN_TAG, "Value": run}]
