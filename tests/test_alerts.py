"""Alerts and the closed loop: who is told what, on this machine and through SNS (moto), and the
retraining that drift or the schedule starts, at most once per RetrainMinDays."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from aws_testing import REGION, aws_env, patched_environ
from pipeline import alerts
from test_deploy_aws import approve, run, sm, updates  # noqa: F401 (fixtures)
from test_infra import TEMPLATE, CfnLoader
from test_runner import new_run, setup  # noqa: F401 (setup is a fixture)


def local_alerts(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------- on this machine


def test_a_local_alert_goes_to_the_log_and_the_hook(notifications_log, tmp_path, monkeypatch):
    received = tmp_path / "hook.json"
    hook = f"{sys.executable} -c \"import sys, pathlib; pathlib.Path({str(received)!r}).write_text(sys.stdin.read())\""
    monkeypatch.setenv(alerts.COMMAND_ENV, hook)
    alert = alerts.notify("drift", "bin-count-production drifted", "brightness p=0.001", endpoint="x")
    assert alert["sent_to"] == str(notifications_log)
    (logged,) = local_alerts(notifications_log)
    assert (logged["kind"], logged["subject"], logged["endpoint"]) == ("drift", "bin-count-production drifted", "x")
    assert json.loads(received.read_text())["message"] == "brightness p=0.001"


def test_a_broken_hook_or_log_never_fails_what_it_reports(notifications_log, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(alerts.COMMAND_ENV, f"{sys.executable} -c 'import sys; sys.exit(3)'")
    alerts.notify("deploy", "s", "m")
    assert "exited 3" in caplog.text
    monkeypatch.setenv(alerts.COMMAND_ENV, "/nonexistent/notifier")
    monkeypatch.setenv(alerts.LOG_ENV, str(tmp_path / "a-file" / "under-a-file.jsonl"))
    (tmp_path / "a-file").write_text("not a folder")
    alerts.notify("deploy", "s", "m")  # neither the log nor the hook works: logged, not raised
    assert "could not run" in caplog.text and "not written" in caplog.text
    with pytest.raises(ValueError, match="unknown alert kind 'party'"):
        alerts.notify("party", "s", "m")


def test_a_run_says_a_version_waits_and_a_failed_run_says_where(setup, notifications_log):
    assert new_run(setup).execute()["status"] == "Succeeded"
    assert new_run(setup, Lr=0.02).execute()["status"] == "Failed"  # accuracy 0.2 < 0.5
    waiting, failed = local_alerts(notifications_log)
    assert waiting["kind"] == "pending-approval" and (waiting["group"], waiting["version"]) == ("toy", 1)
    assert "invmon models show 1 --group toy" in waiting["message"]
    assert failed["kind"] == "run-failed" and failed["step"] == "TooLow" and failed["resumable"] is False
    assert "accuracy 0.2 is below Threshold 0.5" in failed["message"]


# --------------------------------------------------------------------------- through SNS


@pytest.fixture
def topic(sm, monkeypatch):
    """The alerts topic with a queue subscribed to it; returns a function that reads the queue."""
    import boto3

    sns, sqs = boto3.client("sns", region_name=REGION), boto3.client("sqs", region_name=REGION)
    arn = sns.create_topic(Name="invmon-alerts")["TopicArn"]
    queue = sqs.create_queue(QueueName="reviewers")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"})
    monkeypatch.setenv(alerts.TOPIC_ENV, arn)

    def received() -> list[dict]:
        found = []
        while messages := sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []):
            found += [json.loads(m["Body"]) for m in messages]
            sqs.delete_message_batch(QueueUrl=queue, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])
        return found

    return received


@pytest.mark.slow
def test_deploy_outcomes_reach_the_topic(sm, updates, topic, capsys, monkeypatch):
    approve(sm, 1, 2)
    assert run(capsys, "deploy", "--stage", "prod", "--version", "1", "--backend", "aws")[0] == 0
    (deployed,) = topic()
    assert (deployed["kind"], deployed["version"], deployed["endpoint"]) == ("deploy", 1, "bin-count-production")
    monkeypatch.delenv("INVMON_MODEL_ROLE_ARN")  # a deploy that cannot be made
    assert run(capsys, "deploy", "--stage", "prod", "--backend", "aws")[0] != 0
    (failed,) = topic()
    assert failed["kind"] == "deploy-failed" and "needs the model's execution role" in failed["message"]
    monkeypatch.setenv("INVMON_MODEL_ROLE_ARN", "arn:aws:iam::123456789012:role/InvmonModelRole")
    assert run(capsys, "deploy", "--stage", "prod", "--backend", "aws")[0] == 0
    assert [a["kind"] for a in topic()] == ["deploy"]
    assert run(capsys, "models", "reject", "2", "--backend", "aws")[0] == 0  # production served it
    kinds = [a["kind"] for a in topic()]
    assert "rolled-back" in kinds, kinds


def alarm(state: str = "ALARM") -> dict:
    return {"source": "aws.cloudwatch", "detail-type": "CloudWatch Alarm State Change", "region": REGION,
            "detail": {"alarmName": "bin-count-production-drift", "state": {"value": state}}}


SCHEDULE = {"source": "aws.events", "detail-type": "Scheduled Event", "region": REGION, "detail": {}}


def test_retraining_starts_on_drift_at_most_once_per_period(sm, topic, monkeypatch):
    from pipeline.sagemaker import retrain

    sm.create_pipeline(PipelineName="bin-count", RoleArn="arn:aws:iam::123456789012:role/r",
                       PipelineDefinition=json.dumps({"Version": "2020-12-01", "Parameters": [], "Steps": []}))
    sm.start_pipeline_execution(PipelineName="bin-count", PipelineExecutionDisplayName="commit-abc")  # a push
    monkeypatch.setenv("INVMON_PIPELINE_NAME", "bin-count")
    monkeypatch.setenv("INVMON_RETRAIN_MIN_DAYS", "7")
    first = retrain.handler(alarm())
    assert first["started"] and first["reason"] == "drift"
    again = retrain.handler(SCHEDULE)
    assert not again["started"] and "at most one every 7 days" in again["message"]
    later = retrain.handler(alarm(), now=datetime.now(timezone.utc) + timedelta(days=8))
    assert later["started"]
    assert retrain.handler(alarm("OK")) == {"started": False, "ignored": "not a drift alarm or the schedule "
                                                                         "('CloudWatch Alarm State Change')"}
    names = [e["PipelineExecutionDisplayName"] for e in
             sm.list_pipeline_executions(PipelineName="bin-count")["PipelineExecutionSummaries"]]
    assert sum(n.startswith("retrain-drift-") for n in names) == 2 and "commit-abc" in names
    told = topic()
    assert [a["kind"] for a in told] == ["retraining"] * 3
    assert [("held back" in a["subject"]) for a in told] == [False, True, False]


# --------------------------------------------------------------------------- the template


@pytest.fixture(scope="module")
def template() -> dict:
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)


def test_every_alarm_and_event_of_interest_reaches_the_topic(template):
    resources = template["Resources"]
    alarms = {name: r for name, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert {"ProductionErrorAlarm", "DeployFailedAlarm", "DriftAlarm"} <= set(alarms)
    for name, resource in alarms.items():
        assert resource["Properties"]["AlarmActions"] == [{"!Ref": "AlertsTopic"}], name
    for rule, status in (("PendingApprovalRule", ["PendingManualApproval"]), ("PipelineFailureRule", None)):
        props = resources[rule]["Properties"]
        assert props["Targets"][0]["Arn"] == {"!Ref": "AlertsTopic"}, rule
        if status:
            assert props["EventPattern"]["detail"]["ModelApprovalStatus"] == status
    assert resources["PipelineFailureRule"]["Properties"]["EventPattern"]["detail"]["currentStepStatus"] == ["Failed"]
    for function in ("DeployFunction", "RetrainFunction"):
        env = resources[function]["Properties"]["Environment"]["Variables"]
        assert env["INVMON_ALERTS_TOPIC_ARN"] == {"!Ref": "AlertsTopic"}, function


def test_drift_and_the_schedule_start_the_rate_limited_retraining(template):
    resources = template["Resources"]
    drift = resources["DriftRetrainRule"]["Properties"]
    assert drift["EventPattern"]["detail"] == {"state": {"value": ["ALARM"]}}
    assert drift["EventPattern"]["resources"] == [{"!GetAtt": "DriftAlarm.Arn"}]
    monthly = resources["MonthlyRetrainRule"]["Properties"]
    assert monthly["State"] == {"!Ref": "MonthlyRetraining"} and monthly["ScheduleExpression"].startswith("cron(")
    for rule in (drift, monthly):
        assert rule["Targets"][0]["Arn"] == {"!GetAtt": "RetrainFunction.Arn"}
    function = resources["RetrainFunction"]["Properties"]
    assert function["Handler"] == "pipeline.sagemaker.retrain.handler"
    assert function["Environment"]["Variables"]["INVMON_RETRAIN_MIN_DAYS"] == {"!Ref": "RetrainMinDays"}
    assert template["Parameters"]["RetrainMinDays"]["MinValue"] >= 1
    # The retrain function may start and list the pipeline, and publish: nothing else.
    (policy,) = resources["RetrainFunctionRole"]["Properties"]["Policies"]
    actions = sorted(a for s in policy["PolicyDocument"]["Statement"]
                     for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]]))
    assert actions == ["logs:CreateLogStream", "logs:PutLogEvents", "sagemaker:ListPipelineExecutions",
                       "sagemaker:StartPipelineExecution", "sns:Publish"]


def test_the_functions_zip_carries_the_retrain_function(tmp_path):
    from test_deploy_aws import deploy_function_zip

    archive = deploy_function_zip()
    done = subprocess.run([sys.executable, "-I", "-c", (
        "import sys; sys.path = [p for p in sys.path if 'site-packages' in p or 'python3' in p]; "
        "sys.path.insert(0, sys.argv[1]); import pipeline.sagemaker.retrain as r; "
        "assert r.__file__.startswith(sys.argv[1]); print('ok')"), str(archive)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.stdout.strip() == "ok", done.stderr
