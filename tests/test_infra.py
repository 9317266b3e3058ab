"""infra/: cfn-lint passes, the roles are least privilege, the approval rule matches only a
change of this group to Approved (under moto's EventBridge), and the template agrees with the
deploy code it runs (handler, environment, alarm names)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aws_testing import REGION, ROOT, aws_env, patched_environ
from pipeline.registry import deploy
from pipeline.registry.rollout import (LOW_CONFIDENCE_METRIC, LOW_CONFIDENCE_NAMESPACE, ROLLOUT_MODES, alarm_names,
                                       rollout_settings)
from pipeline.registry.stages import STAGES, endpoint_name

CFN_LINT = [sys.executable, "-c", "import sys, cfnlint.runner; sys.exit(cfnlint.runner.main())"]
TEMPLATES = sorted((ROOT / "infra").glob("*.yaml"))
TEMPLATE = ROOT / "infra" / "invmon.yaml"
EVENTS = Path(__file__).parent / "events"
# Actions that take no resource-level permission: "*" is the only resource IAM accepts.
NO_RESOURCE_ACTIONS = {"ecr:GetAuthorizationToken", "sts:GetCallerIdentity",
                       "cloudwatch:PutMetricData", "sagemaker:ListModelPackages",
                       "sagemaker:ListModelPackageGroups", "sagemaker:ListProcessingJobs",
                       "sagemaker:ListEndpointConfigs", "application-autoscaling:DescribeScalableTargets"}


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags kept as {"!Tag": value}."""


CfnLoader.add_multi_constructor("!", lambda loader, tag, node: {f"!{tag}": (
    loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode)
    else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node))})


@pytest.fixture(scope="module")
def template() -> dict:
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)


def resources(template: dict, kind: str) -> dict:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def policies(template: dict):
    """(principal, policy document) for every role's inline policies and its managed policies
    of this template; a managed policy also under its own name."""
    managed = resources(template, "AWS::IAM::ManagedPolicy")
    for name, role in resources(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            yield name, policy["PolicyDocument"]
        for ref in role["Properties"].get("ManagedPolicyArns", []):
            yield name, managed[ref["!Ref"]]["Properties"]["PolicyDocument"]
    for name, policy in managed.items():
        yield name, policy["Properties"]["PolicyDocument"]


def statements(template: dict):
    for name, document in policies(template):
        for statement in document["Statement"]:
            yield name, statement


def test_cfn_lint_passes():
    assert TEMPLATES, "no templates under infra/"
    done = subprocess.run([*CFN_LINT, *map(str, TEMPLATES)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cfn_lint_would_catch_a_broken_template(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace("Runtime: python3.11", "Runtime: python2.1"))
    done = subprocess.run([*CFN_LINT, str(broken)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "python2.1" in done.stdout


def test_no_statement_grants_everything_or_all_of_sagemaker(template):
    seen = 0
    for role, statement in statements(template):
        seen += 1
        actions, targets = as_list(statement["Action"]), as_list(statement["Resource"])
        assert "NotAction" not in statement and "NotResource" not in statement
        if statement["Effect"] == "Deny":  # a deny may be as wide as it likes
            continue
        assert statement["Effect"] == "Allow"
        assert "*" not in actions, (role, statement)
        assert not any(a.endswith(":*") for a in actions), (role, statement)  # sagemaker:* etc.
        if "*" in targets:
            assert set(actions) <= NO_RESOURCE_ACTIONS, (role, statement)
    assert seen >= 20


def _resource_text(statement) -> str:
    return json.dumps(statement["Resource"])


def test_only_the_deploy_function_may_touch_production(template):
    writes = {"sagemaker:CreateEndpoint", "sagemaker:UpdateEndpoint"}
    for role, statement in statements(template):
        if statement["Effect"] == "Allow" and writes & set(as_list(statement["Action"])):
            text = _resource_text(statement)
            if role == "DeployFunctionRole":
                assert "${ModelPackageGroupName}-production" in text
            else:  # the pipeline role: staging only; CodeBuild and models: no endpoints at all
                assert role == "PipelineRole" and "production" not in text
                assert "endpoint/${ModelPackageGroupName}-staging" in text
    build = [s for r, s in statements(template) if r == "BuildRole" and s["Effect"] == "Allow"]
    assert not any(a in ("sagemaker:UpdateModelPackage", "sagemaker:CreateEndpoint")
                   for s in build for a in as_list(s["Action"]))


def test_the_template_runs_the_deploy_code(template):
    props = template["Resources"]["DeployFunction"]["Properties"]
    module, _, name = props["Handler"].rpartition(".")
    assert f"{module}.{name}" == "pipeline.registry.deploy.handler" and callable(deploy.handler)
    assert set(props["Environment"]["Variables"]) >= {
        "INVMON_MODEL_PACKAGE_GROUP", "INVMON_MODEL_ROLE_ARN", "INVMON_INSTANCE_TYPE"}
    alarms = {a["Properties"]["AlarmName"]["!Sub"]
              for a in resources(template, "AWS::CloudWatch::Alarm").values()}
    for stage in STAGES:
        endpoint = endpoint_name("${ModelPackageGroupName}", stage)
        assert set(alarm_names(endpoint)) <= alarms


def test_the_rule_matches_only_this_groups_approvals_and_rejections(template):
    """The template's EventPattern on moto's EventBridge, with the recorded events."""
    import boto3
    from moto import mock_aws

    rule = template["Resources"]["ApprovalRule"]
    pattern = json.loads(json.dumps(rule["Properties"]["EventPattern"])
                         .replace('{"!Ref": "ModelPackageGroupName"}', '"bin-count"'))
    with patched_environ(aws_env()), mock_aws():
        session = boto3.Session(region_name=REGION)
        sqs, events = session.client("sqs"), session.client("events")
        queue = sqs.create_queue(QueueName="deploy-function-stand-in")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name="approval", EventPattern=json.dumps(pattern))
        events.put_targets(Rule="approval", Targets=[{"Id": "1", "Arn": arn}])
        for path in sorted(EVENTS.glob("model_package_*.json")):
            event = json.loads(path.read_text())
            events.put_events(Entries=[{"Source": event["source"], "DetailType": event["detail-type"],
                                        "Detail": json.dumps(event["detail"]),
                                        "Resources": event["resources"]}])
        received = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    details = [json.loads(m["Body"])["detail"] for m in received]
    assert [(d["ModelPackageGroupName"], d["ModelPackageVersion"], d["ModelApprovalStatus"])
            for d in sorted(details, key=lambda d: d["ModelApprovalStatus"])] == [
        ("bin-count", 2, "Approved"), ("bin-count", 1, "Rejected")]


def test_the_pipeline_role_may_read_the_previous_version_evaluate_compares_with(template):
    """scripts/evaluate/previous.py runs in the Evaluate job under the pipeline role: every
    SageMaker call it makes is granted (ListModelPackages takes no resource), on this group
    only, and its evaluation.json is read from the artifact bucket."""
    import re

    source = (ROOT / "scripts" / "evaluate" / "previous.py").read_text()
    calls = {"sagemaker:" + "".join(w.title() for w in c.split("_")) for c in re.findall(r"\bsm\.(\w+)\(", source)}
    assert calls == {"sagemaker:ListModelPackages", "sagemaker:DescribeModelPackage"}
    granted: dict[str, list[str]] = {}
    for role, statement in statements(template):
        if role == "PipelineRole":
            for action in as_list(statement["Action"]):
                granted.setdefault(action, []).append(_resource_text(statement))
    assert calls <= set(granted)
    assert granted["sagemaker:ListModelPackages"] == ['"*"']
    assert all("model-package/${ModelPackageGroupName}/*" in r for r in granted["sagemaker:DescribeModelPackage"])
    assert any("${ArtifactBucketName}/*" in r for r in granted["s3:GetObject"])


# --------------------------------------------------------------------------- the gate, in IAM


def documents(template: dict) -> dict[str, list[dict]]:
    """Each role's (and the reviewer policy's) policy documents, resolved for an example stack."""
    from iam_policies import resolve

    found: dict[str, list[dict]] = {}
    for name, document in policies(template):
        found.setdefault(name, []).append(resolve(template, document))
    return found


PACKAGE = "arn:aws:sagemaker:us-east-1:123456789012:model-package/bin-count/7"
GROUP_ARN = "arn:aws:sagemaker:us-east-1:123456789012:model-package-group/bin-count"


def test_no_role_but_the_reviewers_may_set_approved(template):
    """Read from the template's policies: CreateModelPackage or UpdateModelPackage with
    ModelApprovalStatus=Approved is allowed to the reviewer role (ReviewerPolicy) and to nobody
    else in the stack; the pipeline role registers only PendingManualApproval."""
    from iam_policies import allowed

    found = documents(template)
    roles = set(resources(template, "AWS::IAM::Role"))
    assert {"PipelineRole", "BuildRole", "TestRole", "DeployFunctionRole", "ModelRole", "ReviewerRole"} <= roles
    approving = {"sagemaker:ModelApprovalStatus": "Approved"}
    for action, target in (("sagemaker:UpdateModelPackage", PACKAGE), ("sagemaker:CreateModelPackage", GROUP_ARN),
                           ("sagemaker:CreateModelPackage", PACKAGE)):
        may = {role for role in roles if allowed(found[role], action, target, approving)}
        assert may <= {"ReviewerRole"}, (action, may)
    assert allowed(found["ReviewerRole"], "sagemaker:UpdateModelPackage", PACKAGE, approving)
    pending = {"sagemaker:ModelApprovalStatus": "PendingManualApproval"}
    assert allowed(found["PipelineRole"], "sagemaker:CreateModelPackage", GROUP_ARN, pending)
    assert not allowed(found["PipelineRole"], "sagemaker:CreateModelPackage", GROUP_ARN, {})  # status unsaid
    # Not even a reviewer rewrites or removes the digest every deploy checks.
    assert not allowed(found["ReviewerRole"], "sagemaker:UpdateModelPackage", PACKAGE,
                       {**approving, "sagemaker:CustomerMetadataProperties/ArtifactSha256": "0" * 64})
    assert not allowed(found["ReviewerRole"], "sagemaker:UpdateModelPackage", PACKAGE,
                       {"sagemaker:CustomerMetadataPropertiesToRemove": ["ArtifactSha256"]})
    # The evaluator itself: the same question without the deny would have been answered yes.
    unguarded = [{"Statement": [s for s in d["Statement"] if s.get("Sid") != "NeverApprove"]}
                 for d in found["PipelineRole"]]
    unguarded[0]["Statement"].append({"Effect": "Allow", "Action": "sagemaker:UpdateModelPackage",
                                      "Resource": PACKAGE})
    assert allowed(unguarded, "sagemaker:UpdateModelPackage", PACKAGE, approving)


def test_no_role_that_builds_may_write_a_registered_artifact(template):
    from iam_policies import STACK, allowed

    found = documents(template)
    bucket = f"arn:aws:s3:::{STACK['ArtifactBucketName']}"
    copy = f"{bucket}/registry/bin-count/7/{'ab' * 32}/model.tar.gz"
    code = f"{bucket}/{STACK['DeployFunctionCodeKey']}"
    for role in ("PipelineRole", "BuildRole", "TestRole", "ModelRole", "ReviewerRole"):
        for action in ("s3:PutObject", "s3:DeleteObject", "s3:PutObjectAcl"):
            for target in (copy, code):
                assert not allowed(found[role], action, target), (role, action, target)
    # Only the deploy function writes the verified copies, and production's role reads only them.
    assert allowed(found["DeployFunctionRole"], "s3:PutObject", copy)
    assert allowed(found["ModelRole"], "s3:GetObject", copy)
    assert not allowed(found["ModelRole"], "s3:GetObject", f"{bucket}/bin-count/exec-1/Train/model.tar.gz")
    # Nor the captured traffic the monitor judges: only the endpoints (ModelRole) write it.
    captured = f"{bucket}/capture/bin-count-production/AllTraffic/2026/12/06/00/x.jsonl"
    for role in ("PipelineRole", "BuildRole", "TestRole", "DeployFunctionRole", "ReviewerRole",
                 "MonitorJobRole", "MonitorFunctionRole", "RetrainFunctionRole"):
        assert not allowed(found[role], "s3:PutObject", captured), role
    assert allowed(found["ModelRole"], "s3:PutObject", captured)
    # Staging's capture is written by the staging endpoint the pipeline deploys, which runs as the
    # pipeline's role: that role may write staging's, never production's, and CodeBuild neither.
    staging = f"{bucket}/capture/bin-count-staging/bin-count-staging/AllTraffic/2026/12/06/00/x.jsonl"
    assert allowed(found["PipelineRole"], "s3:PutObject", staging)
    assert not allowed(found["BuildRole"], "s3:PutObject", staging)
    assert not allowed(found["PipelineRole"], "s3:PutObject", f"{bucket}/capture/other-group-production/x.jsonl")
    # Nor the monitor's code and reports: a run may not change what judges it, nor its verdicts.
    for target in (f"{bucket}/invmon/monitor-job/sourcedir.tar.gz", f"{bucket}/invmon/monitor-job/job.json",
                   f"{bucket}/monitor/bin-count-production/20261206-0300/monitor.json"):
        for role in ("PipelineRole", "BuildRole", "TestRole", "DeployFunctionRole", "ReviewerRole", "ModelRole"):
            assert not allowed(found[role], "s3:PutObject", target), (role, target)
    # While the pipeline still writes its own outputs (the deny is that narrow).
    assert allowed(found["PipelineRole"], "s3:PutObject", f"{bucket}/bin-count/exec-1/Evaluate/evaluation.json")


def test_only_the_release_branch_starts_the_pipeline(template):
    """Pushes to the release branch run buildspec.yml (tests, then upsert + start); every other
    branch and every pull request runs the tests only, in a project whose role can do nothing
    in AWS but write its logs, with a buildspec the branch cannot change."""
    from iam_policies import allowed

    projects = resources(template, "AWS::CodeBuild::Project")
    build, test = projects["Build"]["Properties"], projects["Test"]["Properties"]
    (group,) = build["Triggers"]["FilterGroups"]
    assert {"Type": "HEAD_REF", "Pattern": {"!Sub": "^refs/heads/${ReleaseBranch}$"}} in group
    assert {"Type": "EVENT", "Pattern": "PUSH"} in group
    assert build["ServiceRole"] == {"!GetAtt": "BuildRole.Arn"}
    assert test["ServiceRole"] == {"!GetAtt": "TestRole.Arn"}
    others, pulls = test["Triggers"]["FilterGroups"]
    assert {"Type": "HEAD_REF", "Pattern": {"!Sub": "^refs/heads/${ReleaseBranch}$"},
            "ExcludeMatchedPattern": True} in others
    assert pulls[0]["Pattern"].startswith("PULL_REQUEST_CREATED")
    spec = yaml.safe_load(test["Source"]["BuildSpec"])  # inline: the branch's buildspec.yml is not read
    commands = [c for phase in spec["phases"].values() for c in phase.get("commands", [])]
    assert "make test" in commands and not any("invmon" in c for c in commands)
    found = documents(template)
    actions = {a for d in found["TestRole"] for st in d["Statement"] for a in as_list(st["Action"])}
    assert actions == {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"}
    start = "arn:aws:sagemaker:us-east-1:123456789012:pipeline/bin-count"
    assert allowed(found["BuildRole"], "sagemaker:StartPipelineExecution", start)
    assert not allowed(found["TestRole"], "sagemaker:StartPipelineExecution", start)


# Findings of parliament (an IAM policy linter) that are expected, with why: (issue, Sid) -> reason.
# None today; anything it finds fails the test until it is fixed or explained here.
PARLIAMENT_EXPLAINED: dict[tuple[str, str], str] = {}


def test_parliament_finds_nothing_unexplained_in_the_policies(template):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parliament imports pkg_resources
        from parliament import analyze_policy_string

    unexplained, seen = [], 0
    for principal, document in documents(template).items():
        for doc in document:
            for statement in doc["Statement"]:
                seen += 1
                one = {"Version": "2012-10-17", "Statement": [statement]}
                for finding in analyze_policy_string(json.dumps(one)).findings:
                    key = (finding.issue, statement.get("Sid"))
                    if key not in PARLIAMENT_EXPLAINED:
                        unexplained.append((principal, statement.get("Sid"), finding.issue, finding.detail))
    assert seen >= 40
    assert unexplained == []


def test_parliament_would_catch_a_bad_policy():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from parliament import analyze_policy_string

    bad = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sagemaker:CreateModelPackag",
                                                   "Resource": "*"}]}
    assert [f.issue for f in analyze_policy_string(json.dumps(bad)).findings]


# --------------------------------------------------------------------------- the scheduled monitor


def test_the_monitor_schedule_invokes_the_monitor_function_and_can_be_switched_off(template):
    import re

    from pipeline.sagemaker import monitor_job

    parameters = template["Parameters"]
    assert parameters["MonitorSchedule"]["Default"] == "rate(1 day)"
    pattern = parameters["MonitorSchedule"]["AllowedPattern"]
    for good in ("rate(1 day)", "rate(6 hours)", "rate(30 minutes)", "cron(0 3 * * ? *)"):
        assert re.fullmatch(pattern, good), good
    for bad in ("rate(1 fortnight)", "daily", "rate(1 day) ", ""):
        assert not re.fullmatch(pattern, bad), bad
    assert parameters["MonitorScheduleState"]["AllowedValues"] == ["ENABLED", "DISABLED"]
    rule = template["Resources"]["MonitorScheduleRule"]["Properties"]
    assert rule["ScheduleExpression"] == {"!Ref": "MonitorSchedule"}
    assert rule["State"] == {"!Ref": "MonitorScheduleState"}
    assert rule["Targets"] == [{"Id": "monitor-function", "Arn": {"!GetAtt": "MonitorFunction.Arn"}}]
    # The rule, and only it, may invoke the function.
    permissions = [r["Properties"] for r in resources(template, "AWS::Lambda::Permission").values()
                   if r["Properties"]["FunctionName"] == {"!Ref": "MonitorFunction"}]
    assert permissions == [{"FunctionName": {"!Ref": "MonitorFunction"}, "Action": "lambda:InvokeFunction",
                            "Principal": "events.amazonaws.com",
                            "SourceArn": {"!GetAtt": "MonitorScheduleRule.Arn"}}]
    function = template["Resources"]["MonitorFunction"]["Properties"]
    module, _, name = function["Handler"].rpartition(".")
    assert f"{module}.{name}" == "pipeline.sagemaker.monitor_job.handler" and callable(monitor_job.handler)
    variables = function["Environment"]["Variables"]
    assert variables["INVMON_MONITOR_SCHEDULE"] == {"!Ref": "MonitorSchedule"}  # the first window's length
    assert variables["INVMON_MONITOR_ROLE_ARN"] == {"!GetAtt": "MonitorJobRole.Arn"}
    read = set(re.findall(r"INVMON_[A-Z_]+", (ROOT / "pipeline" / "sagemaker" / "monitor_job.py").read_text()))
    assert read - {"INVMON_"} <= set(variables), read - set(variables)
    # A monitor that cannot run tells the reviewers: the function's errors, a failed job.
    alarm = template["Resources"]["MonitorFunctionErrorsAlarm"]["Properties"]
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"!Ref": "MonitorFunction"}}]
    assert alarm["AlarmActions"] == [{"!Ref": "AlertsTopic"}]
    failure = template["Resources"]["MonitorJobFailureRule"]["Properties"]
    assert failure["Targets"][0]["Arn"] == {"!Ref": "AlertsTopic"}


def test_the_drift_alarm_reads_the_metric_the_monitor_writes(template):
    import cloudwatch

    from pipeline.sagemaker import monitor_job

    alarm = template["Resources"]["DriftAlarm"]["Properties"]
    assert alarm["Namespace"] == monitor_job.NAMESPACE
    assert alarm["MetricName"] == cloudwatch.DRIFT_METRIC
    # CloudWatch matches an alarm's dimensions exactly: the metric carries EndpointName alone.
    written = cloudwatch.datums({"drift": True, "window": {"requests": 5}, "tests": {}}, "E")
    (drift,) = [d for d in written if d["MetricName"] == cloudwatch.DRIFT_METRIC]
    assert [d["Name"] for d in drift["Dimensions"]] == [d["Name"] for d in alarm["Dimensions"]] == ["EndpointName"]
    assert alarm["Dimensions"][0]["Value"] == {"!Sub": endpoint_name("${ModelPackageGroupName}", "prod")}
    statement = next(s for r, s in statements(template) if r == "MonitorJobRole" and s.get("Sid") == "DriftMetricsOnly")
    assert statement["Condition"] == {"StringEquals": {"cloudwatch:namespace": monitor_job.NAMESPACE}}


def test_the_monitor_job_role_reads_what_it_judges_and_writes_only_its_reports(template):
    from iam_policies import STACK, allowed

    found = documents(template)["MonitorJobRole"]
    bucket = f"arn:aws:s3:::{STACK['ArtifactBucketName']}"
    reads = [f"{bucket}/capture/bin-count-production/bin-count-production/AllTraffic/2026/12/06/01/x.jsonl",
             f"{bucket}/capture/bin-count-staging/bin-count-staging/AllTraffic/2026/12/06/01/x.jsonl",
             f"{bucket}/bin-count/exec-1/Evaluate/evaluation/baseline.json",
             f"{bucket}/bin-count/exec-1/Train/output/model.tar.gz",
             f"{bucket}/invmon/monitor-job/sourcedir.tar.gz"]
    for target in reads:
        assert allowed(found, "s3:GetObject", target), target
        assert not allowed(found, "s3:PutObject", target), target  # nor rewrites any of it
    for prefix in ("capture/bin-count-production/bin-count-production/AllTraffic/2026/12/06/",
                   "bin-count/exec-1/Evaluate/evaluation/baseline.json", "invmon/monitor-job/sourcedir.tar.gz"):
        assert allowed(found, "s3:ListBucket", bucket, {"s3:prefix": prefix}), prefix
    assert not allowed(found, "s3:ListBucket", bucket, {"s3:prefix": "registry/"})
    for target in (f"{bucket}/registry/bin-count/1/{'ab' * 32}/model.tar.gz", f"{bucket}/other/secret",
                   f"{bucket}/capture/other-group-production/x.jsonl"):
        assert not allowed(found, "s3:GetObject", target), target
    assert allowed(found, "s3:PutObject", f"{bucket}/monitor/bin-count-production/20261206-0300/report.html")
    assert not allowed(found, "s3:PutObject", f"{bucket}/monitor/other-group-production/x/report.html")
    # Metrics in invmon/Monitor only; and nothing in the registry, no endpoint, no role to pass.
    assert allowed(found, "cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": "invmon/Monitor"})
    for namespace in ("AWS/SageMaker", "invmon/Other"):
        assert not allowed(found, "cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": namespace})
    assert not allowed(found, "cloudwatch:PutMetricData", "*")
    for action, target in (("sagemaker:UpdateModelPackage", PACKAGE), ("sagemaker:CreateModelPackage", GROUP_ARN),
                           ("sagemaker:UpdateEndpoint", "arn:aws:sagemaker:us-east-1:123456789012:endpoint/bin-count-production"),
                           ("sagemaker:CreateProcessingJob", "arn:aws:sagemaker:us-east-1:123456789012:processing-job/bin-count-mon-prod-1"),
                           ("iam:PassRole", "arn:aws:iam::123456789012:role/invmon-PipelineRole-ABC")):
        assert not allowed(found, action, target, {"sagemaker:ModelApprovalStatus": "Approved"}), action
        assert not allowed(found, action, target), action
    assert allowed(found, "ecr:BatchGetImage", "arn:aws:ecr:us-east-1:763104351884:repository/pytorch-training")
    assert not allowed(found, "ecr:BatchGetImage", "arn:aws:ecr:us-east-1:123456789012:repository/anything")


def test_only_the_monitor_job_role_puts_drift_metrics_and_only_the_function_starts_it(template):
    """A forged DriftDetected would start a retraining, a forged 0 could hide drift for an hour:
    no other role of the stack may put metrics in invmon/Monitor. And the monitor function starts
    monitor jobs as the monitor's role, nothing else."""
    from iam_policies import allowed

    found = documents(template)
    drift = {"cloudwatch:namespace": "invmon/Monitor"}
    may = {role for role in resources(template, "AWS::IAM::Role")
           if allowed(found[role], "cloudwatch:PutMetricData", "*", drift)}
    assert may == {"MonitorJobRole"}
    job_role = "arn:aws:iam::123456789012:role/invmon-MonitorJobRole-ABC"
    to_sagemaker = {"iam:PassedToService": "sagemaker.amazonaws.com"}
    passers = {role for role in resources(template, "AWS::IAM::Role")
               if allowed(found[role], "iam:PassRole", job_role, to_sagemaker)}
    assert passers == {"MonitorFunctionRole"}
    function = found["MonitorFunctionRole"]
    jobs = "arn:aws:sagemaker:us-east-1:123456789012:processing-job"
    assert allowed(function, "sagemaker:CreateProcessingJob", f"{jobs}/bin-count-mon-prod-2612060300")
    assert not allowed(function, "sagemaker:CreateProcessingJob", f"{jobs}/bin-count-Preprocess-abc")
    assert not allowed(function, "iam:PassRole", "arn:aws:iam::123456789012:role/invmon-PipelineRole-ABC", to_sagemaker)
    for action in ("s3:PutObject", "sagemaker:CreateEndpoint", "sagemaker:UpdateEndpoint", "sagemaker:CreateModel",
                   "sagemaker:UpdateModelPackage", "sns:Publish"):
        assert not any(action == a for d in function for st in d["Statement"] if st["Effect"] == "Allow"
                       for a in as_list(st["Action"])), action


def test_the_failed_monitor_job_rule_matches_only_this_groups_monitor_jobs(template):
    import boto3
    from moto import mock_aws

    rule = template["Resources"]["MonitorJobFailureRule"]
    pattern = json.loads(json.dumps(rule["Properties"]["EventPattern"])
                         .replace('{"!Sub": "${ModelPackageGroupName}-mon-"}', '"bin-count-mon-"'))
    with patched_environ(aws_env()), mock_aws():
        session = boto3.Session(region_name=REGION)
        sqs, events = session.client("sqs"), session.client("events")
        queue = sqs.create_queue(QueueName="alerts-stand-in")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name="monitor-failed", EventPattern=json.dumps(pattern))
        events.put_targets(Rule="monitor-failed", Targets=[{"Id": "1", "Arn": arn}])
        for name, status in (("bin-count-mon-prod-2612060300", "Failed"), ("bin-count-mon-prod-2612070300", "Completed"),
                             ("bin-count-Preprocess-abc", "Failed"), ("other-mon-prod-2612060300", "Failed")):
            events.put_events(Entries=[{"Source": "aws.sagemaker", "DetailType": "SageMaker Processing Job State Change",
                                        "Detail": json.dumps({"ProcessingJobName": name, "ProcessingJobStatus": status,
                                                              "FailureReason": "monitor: error: refused"}),
                                        "Resources": []}])
        received = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    assert [json.loads(m["Body"])["detail"]["ProcessingJobName"] for m in received] == ["bin-count-mon-prod-2612060300"]


# --------------------------------------------------------------------------- rollout, scaling, clean-up


def test_the_deploy_function_gets_the_rollout_and_scaling_the_template_sets(template):
    """Every INVMON_* variable the deploy code reads is set on the function, each from the stack
    parameter of that name, and the parameters' defaults are the code's own."""
    import re

    variables = template["Resources"]["DeployFunction"]["Properties"]["Environment"]["Variables"]
    read = {name for path in (ROOT / "pipeline" / "registry").glob("*.py")  # the deploy code, all its modules
            for name in re.findall(r"INVMON_[A-Z0-9_]+", path.read_text())}
    read -= {"INVMON_MODEL_PACKAGE_ARN", "INVMON_ARTIFACT_SHA256"}  # the model's environment, not the function's
    assert read <= set(variables), read - set(variables)
    wiring = {"INVMON_ROLLOUT_MODE": "ProductionRolloutMode", "INVMON_ROLLOUT_PERCENT": "ProductionRolloutPercent",
              "INVMON_ROLLOUT_WAIT_SECONDS": "ProductionRolloutWaitSeconds",
              "INVMON_ROLLOUT_TERMINATION_WAIT_SECONDS": "ProductionTerminationWaitSeconds",
              "INVMON_MIN_CAPACITY_PROD": "ProductionMinCapacity", "INVMON_MAX_CAPACITY_PROD": "ProductionMaxCapacity",
              "INVMON_MIN_CAPACITY_STAGING": "StagingMinCapacity", "INVMON_MAX_CAPACITY_STAGING": "StagingMaxCapacity",
              "INVMON_INVOCATIONS_PER_INSTANCE": "InvocationsPerInstanceTarget"}
    assert {v: variables[v] for v in wiring} == {v: {"!Ref": p} for v, p in wiring.items()}
    parameters = template["Parameters"]
    defaults = {name: str(parameters[p]["Default"]) for name, p in wiring.items()}
    rollout, scaling = rollout_settings(defaults)
    assert (rollout, scaling) == rollout_settings({})  # the template's defaults are the code's
    assert parameters["ProductionRolloutMode"]["AllowedValues"] == list(ROLLOUT_MODES)


def test_the_rollback_alarms_watch_errors_p99_latency_and_low_confidence(template):
    alarms = {a["Properties"]["AlarmName"]["!Sub"]: a["Properties"]
              for a in resources(template, "AWS::CloudWatch::Alarm").values()}
    for stage in STAGES:
        endpoint = endpoint_name("${ModelPackageGroupName}", stage)
        errors, latency, confidence = (alarms[name] for name in alarm_names(endpoint))
        assert (errors["Namespace"], errors["MetricName"], errors["Statistic"]) == (
            "AWS/SageMaker", "Invocation5XXErrors", "Sum")
        assert (latency["Namespace"], latency["MetricName"], latency["ExtendedStatistic"]) == (
            "AWS/SageMaker", "ModelLatency", "p99")
        assert "Statistic" not in latency  # CloudWatch takes one or the other
        assert latency["Threshold"] == {"!Ref": "LatencyP99ThresholdMicroseconds"}
        assert (confidence["Namespace"], confidence["MetricName"], confidence["Statistic"]) == (
            LOW_CONFIDENCE_NAMESPACE, LOW_CONFIDENCE_METRIC, "Average")  # the share of answers
        assert confidence["Dimensions"] == [{"Name": "EndpointName", "Value": {"!Sub": endpoint}}]
        assert confidence["TreatMissingData"] == "notBreaching"  # no publisher yet: no data is no alarm
        for alarm in (errors, latency, confidence):
            assert alarm["AlarmActions"] == [{"!Ref": "AlertsTopic"}]


def test_the_in_service_rule_matches_only_the_groups_two_endpoints_coming_in_service(template):
    import boto3
    from moto import mock_aws

    rule = template["Resources"]["EndpointInServiceRule"]["Properties"]
    assert rule["Targets"] == [{"Id": "deploy-function", "Arn": {"!GetAtt": "DeployFunction.Arn"}}]
    pattern = json.loads(json.dumps(rule["EventPattern"]).replace("${ModelPackageGroupName}", "bin-count")
                         .replace('{"!Sub": "bin-count-production"}', '"bin-count-production"')
                         .replace('{"!Sub": "bin-count-staging"}', '"bin-count-staging"'))
    with patched_environ(aws_env()), mock_aws():
        session = boto3.Session(region_name=REGION)
        sqs, events = session.client("sqs"), session.client("events")
        queue = sqs.create_queue(QueueName="deploy-function-stand-in")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name="in-service", EventPattern=json.dumps(pattern))
        events.put_targets(Rule="in-service", Targets=[{"Id": "1", "Arn": arn}])
        for path in sorted(EVENTS.glob("*.json")):
            event = json.loads(path.read_text())
            events.put_events(Entries=[{"Source": event["source"], "DetailType": event["detail-type"],
                                        "Detail": json.dumps(event["detail"]), "Resources": event["resources"]}])
        received = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    assert sorted(json.loads(m["Body"])["detail"]["EndpointName"] for m in received) == [
        "bin-count-production", "bin-count-staging"]
    invokers = {r["Properties"]["SourceArn"]["!GetAtt"] for r in resources(template, "AWS::Lambda::Permission").values()
                if r["Properties"]["FunctionName"] == {"!Ref": "DeployFunction"}}
    assert invokers == {"ApprovalRule.Arn", "EndpointInServiceRule.Arn"}


ARN = "arn:aws:sagemaker:us-east-1:123456789012"


def test_no_role_may_delete_another_groups_models_or_configs(template):
    """The clean-up deletes only models and endpoint configs of the group's two endpoints that
    carry the group's tag: a name prefix alone would also match another group's (bin-count-* is
    bin-count-eu-*), so a deploy role cannot be used to delete another group's models."""
    from iam_policies import allowed

    found = documents(template)
    own = {"aws:ResourceTag/invmon:group": "bin-count"}
    ours = [f"{ARN}:model/bin-count-production-v3-0123456789", f"{ARN}:endpoint-config/bin-count-staging-v1-0123456789",
            f"{ARN}:endpoint-config/bin-count-staging-p4jn9xou8a8s", f"{ARN}:model/bin-count-Deploy-Model-abc"]
    for target in ours:
        action = "sagemaker:DeleteModel" if ":model/" in target else "sagemaker:DeleteEndpointConfig"
        assert allowed(found["DeployFunctionRole"], action, target, own), target
        assert not allowed(found["DeployFunctionRole"], action, target), target  # untagged: never
        assert not allowed(found["DeployFunctionRole"], action, target, {"aws:ResourceTag/invmon:group": "bin-count-eu"})
    theirs = [f"{ARN}:model/bin-count-eu-production-v1-0123456789", f"{ARN}:model/other-production-v1-0123456789",
              f"{ARN}:endpoint-config/other-staging-v1-0123456789"]
    for target in theirs:
        action = "sagemaker:DeleteModel" if ":model/" in target else "sagemaker:DeleteEndpointConfig"
        for tag in ("bin-count", "bin-count-eu", "other"):  # whatever they are tagged
            assert not allowed(found["DeployFunctionRole"], action, target,
                               {"aws:ResourceTag/invmon:group": tag}), (target, tag)
    # No other role of the stack deletes a model or an endpoint config at all.
    for role in set(resources(template, "AWS::IAM::Role")) - {"DeployFunctionRole"}:
        for target in ours + theirs:
            for action in ("sagemaker:DeleteModel", "sagemaker:DeleteEndpointConfig"):
                assert not allowed(found[role], action, target, own), (role, action, target)


def test_only_the_deploy_function_scales_and_only_the_groups_two_endpoints(template):
    """Scalable targets are named by an id, not the endpoint: the role may register SageMaker
    variants only (service and dimension), and Application Auto Scaling checks that the caller
    may change the variant it scales (UpdateEndpointWeightsAndCapacities), which the role may on
    the group's two endpoints only."""
    from iam_policies import allowed

    found = documents(template)
    deployer = found["DeployFunctionRole"]
    target = "arn:aws:application-autoscaling:us-east-1:123456789012:scalable-target/056ba3c1b1b946c1ac5d2a0d7f8a2e8c"
    variant = {"application-autoscaling:service-namespace": "sagemaker",
               "application-autoscaling:scalable-dimension": "sagemaker:variant:DesiredInstanceCount"}
    for action in ("RegisterScalableTarget", "PutScalingPolicy", "DeregisterScalableTarget"):
        assert allowed(deployer, f"application-autoscaling:{action}", target, variant), action
        for other in ({**variant, "application-autoscaling:service-namespace": "ecs"},
                      {**variant, "application-autoscaling:scalable-dimension": "dynamodb:table:ReadCapacityUnits"},
                      {}):
            assert not allowed(deployer, f"application-autoscaling:{action}", target, other), (action, other)
    for stage in ("production", "staging"):
        assert allowed(deployer, "sagemaker:UpdateEndpointWeightsAndCapacities", f"{ARN}:endpoint/bin-count-{stage}")
        assert allowed(deployer, "cloudwatch:PutMetricAlarm", "arn:aws:cloudwatch:us-east-1:123456789012:alarm:"
                       f"TargetTracking-endpoint/bin-count-{stage}/variant/AllTraffic-AlarmHigh-1234")
    for endpoint in ("bin-count-eu-production", "other-production", "bin-count-production-2"):
        assert not allowed(deployer, "sagemaker:UpdateEndpointWeightsAndCapacities", f"{ARN}:endpoint/{endpoint}")
        assert not allowed(deployer, "cloudwatch:PutMetricAlarm", "arn:aws:cloudwatch:us-east-1:123456789012:alarm:"
                           f"TargetTracking-endpoint/{endpoint}/variant/AllTraffic-AlarmHigh-1234")
    assert not allowed(deployer, "cloudwatch:PutMetricAlarm",
                       "arn:aws:cloudwatch:us-east-1:123456789012:alarm:bin-count-production-invocation-5xx")
    for role in set(resources(template, "AWS::IAM::Role")) - {"DeployFunctionRole"}:
        assert not allowed(found[role], "application-autoscaling:RegisterScalableTarget", target, variant), role
        assert not allowed(found[role], "sagemaker:UpdateEndpointWeightsAndCapacities",
                           f"{ARN}:endpoint/bin-count-production"), role


# --------------------------------------------------------------------------- smoke test override, build, reviewers


def test_no_role_that_runs_or_builds_may_write_the_smoke_test_override(template):
    """The pipeline role records the SmokeTest* verdict, and nothing else, on the group's versions;
    the operator's override (SmokeTestOverride, which lets production serve a version without a
    passing smoke test) is outside what it may write, at registration or after, alone or beside
    the verdict. A reviewer may record it (invmon models approve --force-no-smoke)."""
    from iam_policies import allowed

    found = documents(template)
    pipeline = found["PipelineRole"]
    verdict = {"sagemaker:CustomerMetadataProperties/SmokeTest": "passed",
               "sagemaker:CustomerMetadataProperties/SmokeTestRun": "arn:...:execution/abc"}
    override = {"sagemaker:CustomerMetadataProperties/SmokeTestOverride": "by the pipeline"}
    assert allowed(pipeline, "sagemaker:UpdateModelPackage", PACKAGE, verdict)
    assert not allowed(pipeline, "sagemaker:UpdateModelPackage", PACKAGE, {**verdict, **override})
    assert not allowed(pipeline, "sagemaker:UpdateModelPackage", PACKAGE, override)
    pending = {"sagemaker:ModelApprovalStatus": "PendingManualApproval"}
    assert allowed(pipeline, "sagemaker:CreateModelPackage", GROUP_ARN, {**pending, **verdict})
    assert not allowed(pipeline, "sagemaker:CreateModelPackage", GROUP_ARN, {**pending, **override})
    for role in set(resources(template, "AWS::IAM::Role")) - {"ReviewerRole"}:
        for action, target in (("sagemaker:UpdateModelPackage", PACKAGE), ("sagemaker:CreateModelPackage", GROUP_ARN)):
            assert not allowed(found[role], action, target, {**pending, **override}), (role, action)
    approving = {"sagemaker:ModelApprovalStatus": "Approved"}
    assert allowed(found["ReviewerRole"], "sagemaker:UpdateModelPackage", PACKAGE, override)
    assert allowed(found["ReviewerRole"], "sagemaker:UpdateModelPackage", PACKAGE, {**approving, **override})
    # The evaluator itself: without the Null on the override the verdict's allow would let it through.
    statement = next(s for d in pipeline for s in d["Statement"] if s.get("Sid") == "RecordTheSmokeTest")
    loose = {**statement, "Condition": {"Null": {k: v for k, v in statement["Condition"]["Null"].items()
                                                 if not k.endswith("/SmokeTestOverride")}}}
    assert allowed([{"Statement": [loose]}], "sagemaker:UpdateModelPackage", PACKAGE, {**verdict, **override})


def test_the_build_keeps_pips_cache_where_the_buildspec_says(template):
    """buildspec.yml's cache: paths: are kept only by a project Cache; S3, in the artifact bucket
    under a prefix the build role may read and write (and no other role writes)."""
    from iam_policies import allowed

    buildspec = yaml.safe_load((ROOT / "buildspec.yml").read_text())
    assert buildspec["cache"]["paths"]
    cache = template["Resources"]["Build"]["Properties"]["Cache"]
    assert cache["Type"] == "S3"
    location = resolve_sub(cache["Location"])
    assert location == "invmon-artifacts/build-cache/invmon-build"
    found = documents(template)
    key = f"arn:aws:s3:::{location}/0123abcd.zip"
    for action in ("s3:GetObject", "s3:PutObject"):
        assert allowed(found["BuildRole"], action, key), action
    assert not allowed(found["TestRole"], "s3:PutObject", key)  # a pushed branch cannot poison it
    assert "Cache" not in template["Resources"]["Test"]["Properties"]


def test_the_build_role_publishes_test_reports_to_its_own_report_groups_only(template):
    from iam_policies import allowed

    found = documents(template)
    buildspec = yaml.safe_load((ROOT / "buildspec.yml").read_text())
    prefix = "arn:aws:codebuild:us-east-1:123456789012:report-group"
    for group in buildspec["reports"]:  # CodeBuild names it <project>-<name>
        for action in ("CreateReportGroup", "CreateReport", "UpdateReport", "BatchPutTestCases",
                       "BatchPutCodeCoverages"):
            assert allowed(found["BuildRole"], f"codebuild:{action}", f"{prefix}/invmon-build-{group}"), action
            assert not allowed(found["BuildRole"], f"codebuild:{action}", f"{prefix}/invmon-test-{group}"), action
            assert not allowed(found["BuildRole"], f"codebuild:{action}", f"{prefix}/other-{group}"), action
            assert not allowed(found["TestRole"], f"codebuild:{action}", f"{prefix}/invmon-build-{group}"), action


def test_reviewers_may_read_the_parameters_of_the_groups_executions_only(template):
    """`invmon models show --backend aws` reads the execution's definition and parameters."""
    from iam_policies import allowed

    found = documents(template)
    mine = f"{ARN}:pipeline/bin-count/execution/abc123"
    for action in ("DescribePipelineDefinitionForExecution", "ListPipelineParametersForExecution"):
        assert allowed(found["ReviewerRole"], f"sagemaker:{action}", mine), action
        assert allowed(found["ReviewerPolicy"], f"sagemaker:{action}", mine), action
        assert not allowed(found["ReviewerRole"], f"sagemaker:{action}", f"{ARN}:pipeline/other/execution/abc123")


def resolve_sub(value) -> str:
    from iam_policies import STACK

    text = value["!Sub"]
    for key, replacement in STACK.items():
        text = text.replace("${" + key + "}", replacement)
    return text
