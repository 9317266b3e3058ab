"""The monitor's verdicts as CloudWatch metrics (monitor.py --cloudwatch-namespace NS --endpoint E).

Per run, in namespace NS (invmon/Monitor on AWS):

  DriftDetected   0 or 1               dimension EndpointName=E (what the stack's drift alarm reads)
  WindowRequests  requests in window   dimension EndpointName=E
  PValue          each test's p-value  dimensions EndpointName=E, Test=<test> (none for no_data)
  WindowSize      each test's window   dimensions EndpointName=E, Test=<test>

DriftDetected carries EndpointName alone: CloudWatch tells metrics apart by their whole set of
dimensions, and an alarm names that set exactly. Throttling and transient errors are retried by
botocore ("standard" retry mode); anything else is one line. Only imported when asked: without
the flag the monitor never touches AWS.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

DRIFT_METRIC = "DriftDetected"
ENDPOINT_DIMENSION = "EndpointName"
TEST_DIMENSION = "Test"
MAX_PER_CALL = 1000  # PutMetricData's limit on datums per request


class MetricsError(Exception):
    """The metrics could not be published: one line (the verdicts are written all the same)."""


def datums(result: dict, endpoint: str, when: datetime | None = None) -> list[dict]:
    when = when or datetime.now(timezone.utc)
    endpoint_only = [{"Name": ENDPOINT_DIMENSION, "Value": endpoint}]
    found = [
        {"MetricName": DRIFT_METRIC, "Dimensions": endpoint_only, "Timestamp": when,
         "Value": 1.0 if result["drift"] else 0.0, "Unit": "None"},
        {"MetricName": "WindowRequests", "Dimensions": endpoint_only, "Timestamp": when,
         "Value": float(result["window"]["requests"]), "Unit": "Count"},
    ]
    for name, test in result["tests"].items():
        by_test = [*endpoint_only, {"Name": TEST_DIMENSION, "Value": name}]
        found.append({"MetricName": "WindowSize", "Dimensions": by_test, "Timestamp": when,
                      "Value": float(test.get("window_size") or 0), "Unit": "Count"})
        if test.get("p_value") is not None:
            found.append({"MetricName": "PValue", "Dimensions": by_test, "Timestamp": when,
                          "Value": float(test["p_value"]), "Unit": "None"})
    return found


def publish(result: dict, namespace: str, endpoint: str, client=None) -> int:
    """Put the run's metrics; returns how many were put."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise MetricsError("no AWS region for CloudWatch: set AWS_REGION or AWS_DEFAULT_REGION")
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 5)
        client = boto3.Session(region_name=region).client("cloudwatch", config=Config(
            retries={"mode": "standard", "max_attempts": attempts}, connect_timeout=10, read_timeout=30))
    found = datums(result, endpoint)
    try:
        for start in range(0, len(found), MAX_PER_CALL):
            client.put_metric_data(Namespace=namespace, MetricData=found[start:start + MAX_PER_CALL])
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise MetricsError(f"CloudWatch refused the metrics for {endpoint} in {namespace}: "
                           f"{error.get('Code', 'Error')}: {error.get('Message', '')}".rstrip(": ")) from None
    except BotoCoreError as exc:
        raise MetricsError(f"cannot reach CloudWatch: {exc}") from None
    return len(found)
