"""Alerts: a version waits for approval, a run failed, a deploy succeeded, failed or rolled back,
drift was found, a retraining started or was held back.

On AWS (INVMON_ALERTS_TOPIC_ARN set, as infra/invmon.yaml sets it for its functions) each alert
is published to the stack's SNS topic, which reviewers subscribe to. On this machine it is
appended to $INVMON_HOME/notifications.jsonl (or $INVMON_NOTIFICATIONS), and INVMON_NOTIFY_COMMAND,
when set, is run with the alert as JSON on its stdin (a desktop notifier, a chat webhook script).

An alert never fails what it reports on: a topic or a hook that does not answer is logged and
the deploy, run or check goes on. Plain boto3, so the Lambda functions' zip carries it.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
from datetime import datetime, timezone

TOPIC_ENV = "INVMON_ALERTS_TOPIC_ARN"
COMMAND_ENV = "INVMON_NOTIFY_COMMAND"
LOG_ENV = "INVMON_NOTIFICATIONS"
LOG_NAME = "notifications.jsonl"
KINDS = ("pending-approval", "run-failed", "deploy", "deploy-failed", "rolled-back", "drift",
         "retraining")
HOOK_TIMEOUT_S = 10

log = logging.getLogger("invmon.alerts")


def notify(kind: str, subject: str, message: str, **details) -> dict:
    """Send one alert (see the module docstring); returns it, with where it went."""
    if kind not in KINDS:
        raise ValueError(f"unknown alert kind {kind!r}; one of {', '.join(KINDS)}")
    alert = {"kind": kind, "subject": subject, "message": message, "time": _now(), **details}
    topic = os.environ.get(TOPIC_ENV, "").strip()
    alert["sent_to"] = _publish(topic, alert) if topic else _record_locally(alert)
    return alert


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _publish(topic: str, alert: dict) -> str:
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.sagemaker.clients import client, describe_error

    region = topic.split(":")[3] if topic.count(":") >= 5 else None
    try:
        client("sns", region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")).publish(
            TopicArn=topic, Subject=alert["subject"][:100], Message=json.dumps(alert, indent=2),
            MessageAttributes={"kind": {"DataType": "String", "StringValue": alert["kind"]}})
        return topic
    except (ClientError, BotoCoreError, ValueError) as exc:
        log.warning("alert %r not published to %s: %s", alert["subject"], topic,
                    describe_error(exc) if isinstance(exc, ClientError) else exc)
        return ""


def local_log():
    from pathlib import Path

    from pipeline.home import invmon_home

    return Path(os.environ[LOG_ENV]) if os.environ.get(LOG_ENV) else invmon_home() / LOG_NAME


def _record_locally(alert: dict) -> str:
    path = local_log()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(alert) + "\n")
    except OSError as exc:
        log.warning("alert %r not written to %s: %s", alert["subject"], path, exc.strerror or exc)
    command = os.environ.get(COMMAND_ENV, "").strip()
    if command:
        try:
            done = subprocess.run(shlex.split(command), input=json.dumps(alert), text=True,
                                  capture_output=True, timeout=HOOK_TIMEOUT_S)
            if done.returncode:
                log.warning("%s exited %d: %s", COMMAND_ENV, done.returncode, done.stderr.strip()[-300:])
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s could not run: %s", COMMAND_ENV, exc)
    return str(path)
