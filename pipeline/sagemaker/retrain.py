"""Retraining that closes the loop: the retrain function of infra/invmon.yaml.

Invoked by EventBridge when the drift alarm goes to ALARM, and by the monthly schedule when the
stack switches it on. It starts the training pipeline, at most once every INVMON_RETRAIN_MIN_DAYS
days: a retraining already started within that time (an execution named retrain-*) holds the
next one back. Either way an alert says what happened. The new version is registered
PendingManualApproval like any other; only a reviewer puts it in production.

Plain boto3, so it ships in the deploy function's zip (`make deploy-function`).
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

from pipeline.alerts import notify
from pipeline.sagemaker.clients import client, resolve_region

PREFIX = "retrain-"
ALARM_EVENT = "CloudWatch Alarm State Change"
SCHEDULE_EVENT = "Scheduled Event"
MAX_PARALLEL_STEPS = 2  # as `invmon start` (pipeline/sagemaker/definition.py)


def reason_for(event: dict) -> str | None:
    """"drift" (the alarm went to ALARM), "schedule", or None for anything else."""
    if event.get("source") == "aws.cloudwatch" and event.get("detail-type") == ALARM_EVENT:
        return "drift" if ((event.get("detail") or {}).get("state") or {}).get("value") == "ALARM" else None
    if event.get("source") == "aws.events" and event.get("detail-type") == SCHEDULE_EVENT:
        return "schedule"
    return None


def last_retraining(sm, pipeline: str) -> dict | None:
    """The newest execution this function started (display name retrain-*), or None."""
    paginator_args = {"PipelineName": pipeline, "SortBy": "CreationTime", "SortOrder": "Descending"}
    token = None
    while True:
        page = sm.list_pipeline_executions(**paginator_args, **({"NextToken": token} if token else {}))
        for summary in page.get("PipelineExecutionSummaries", []):
            if str(summary.get("PipelineExecutionDisplayName", "")).startswith(PREFIX):
                return summary
        token = page.get("NextToken")
        if not token:
            return None


def handler(event: dict, context=None, now=None) -> dict:
    pipeline = os.environ["INVMON_PIPELINE_NAME"]
    min_days = float(os.environ.get("INVMON_RETRAIN_MIN_DAYS", "7"))
    reason = reason_for(event)
    if reason is None:
        result = {"started": False, "ignored": f"not a drift alarm or the schedule ({event.get('detail-type')!r})"}
        print(json.dumps(result))
        return result
    now = now or datetime.now(timezone.utc)
    sm = client("sagemaker", resolve_region(event.get("region")))
    last = last_retraining(sm, pipeline)
    since = now - last["StartTime"] if last and last.get("StartTime") else None
    if since is not None and since < timedelta(days=min_days):
        message = (f"{reason}: retraining held back, {last['PipelineExecutionDisplayName']} started "
                   f"{since.total_seconds() / 86400:.1f} days ago; at most one every {min_days:g} days")
        result = {"started": False, "reason": reason, "message": message}
        notify("retraining", f"{pipeline}: retraining held back ({reason})", message, pipeline=pipeline)
    else:
        name = f"{PREFIX}{reason}-{now:%Y%m%d-%H%M}"
        arn = sm.start_pipeline_execution(
            PipelineName=pipeline, PipelineExecutionDisplayName=name,
            PipelineExecutionDescription=f"started by the {reason} ({event.get('detail-type')})",
            ParallelismConfiguration={"MaxParallelExecutionSteps": MAX_PARALLEL_STEPS},
        )["PipelineExecutionArn"]
        message = f"{reason}: started {name} ({arn}); its model waits for approval like any other"
        result = {"started": True, "reason": reason, "execution": arn, "message": message}
        notify("retraining", f"{pipeline}: retraining started ({reason})", message, pipeline=pipeline,
               execution=arn)
    print(json.dumps(result))  # CloudWatch Logs
    return result
