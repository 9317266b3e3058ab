"""Data capture: what share of an endpoint's requests and answers is kept, and where.

One definition for every deploy, the pipeline's staging Deploy step included
(pipeline/dag/compile.py, pipeline/sagemaker/definition.py), and for the monitor, which reads the
capture (pipeline/sagemaker/monitor_job.py, scripts/monitor/).
"""
from __future__ import annotations

# All of staging's requests, a sample of production's (infra/invmon.yaml's ProductionCapturePercent
# overrides production's through INVMON_CAPTURE_PERCENT_PROD).
CAPTURE_PERCENT = {"staging": 100, "prod": 20}
CAPTURE_PREFIX = "capture"


def capture_uri_parts(bucket, endpoint) -> list:
    """The parts of s3://<bucket>/capture/<endpoint>, joined on "/": where an endpoint's
    DataCaptureConfig writes and the monitor reads. Parts, so that the pipeline's staging Deploy
    can join them with its endpoint-name parameter (pipeline/sagemaker/definition.py)."""
    return ["s3:/", bucket, CAPTURE_PREFIX, endpoint]


def capture_uri(bucket: str, endpoint: str) -> str:
    return "/".join(capture_uri_parts(bucket, endpoint))


def capture_settings(percent: int) -> dict:
    """DataCaptureConfig less its destination: requests and answers, a share of them; JSON answers
    kept as text, photos (any other content type) in base64."""
    return {"EnableCapture": True, "InitialSamplingPercentage": percent,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]}}
