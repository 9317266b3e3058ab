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
from pipeline import deploy

CFN_LINT = [sys.executable, "-c", "import sys, cfnlint.runner; sys.exit(cfnlint.runner.main())"]
TEMPLATES = sorted((ROOT / "infra").glob("*.yaml"))
TEMPLATE = ROOT / "infra" / "invmon.yaml"
EVENTS = Path(__file__).parent / "events"
# Actions that take no resource-level permission: "*" is the only resource IAM accepts.
NO_RESOURCE_ACTIONS = {"ecr:GetAuthorizationToken", "sts:GetCallerIdentity",
                       "cloudwatch:PutMetricData", "sagemaker:ListModelPackages"}


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


def statements(template: dict):
    for name, role in resources(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
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
        assert statement["Effect"] == "Allow" and "NotAction" not in statement
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
        if writes & set(as_list(statement["Action"])):
            text = _resource_text(statement)
            if role == "DeployFunctionRole":
                assert "${ModelPackageGroupName}-production" in text
            else:  # the pipeline role: staging only; CodeBuild and models: no endpoints at all
                assert role == "PipelineRole" and "production" not in text
                assert "endpoint/${ModelPackageGroupName}-staging" in text
    build = [s for r, s in statements(template) if r == "BuildRole"]
    assert not any(a in ("sagemaker:UpdateModelPackage", "sagemaker:CreateEndpoint")
                   for s in build for a in as_list(s["Action"]))


def test_the_template_runs_the_deploy_code(template):
    (function,) = resources(template, "AWS::Lambda::Function").values()
    props = function["Properties"]
    module, _, name = props["Handler"].rpartition(".")
    assert f"{module}.{name}" == "pipeline.deploy.handler" and callable(deploy.handler)
    assert set(props["Environment"]["Variables"]) >= {
        "INVMON_MODEL_PACKAGE_GROUP", "INVMON_MODEL_ROLE_ARN", "INVMON_INSTANCE_TYPE"}
    alarms = {a["Properties"]["AlarmName"]["!Sub"]
              for a in resources(template, "AWS::CloudWatch::Alarm").values()}
    for stage in deploy.STAGES:
        endpoint = deploy.endpoint_name("${ModelPackageGroupName}", stage)
        assert set(deploy.alarm_names(endpoint)) <= alarms


def test_the_rule_matches_only_this_groups_change_to_approved(template):
    """The template's EventPattern on moto's EventBridge, with the recorded events."""
    import boto3
    from moto import mock_aws

    (rule,) = resources(template, "AWS::Events::Rule").values()
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
            for d in details] == [("bin-count", 2, "Approved")]


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
