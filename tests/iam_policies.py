"""The template's IAM policies as IAM reads them, for the infra tests: !Sub and !GetAtt resolved
for one example stack, and a small evaluator of Allow/Deny with the condition operators the
template uses (an operator it does not know fails the test rather than guess).

IAM's rule: an explicit Deny wins; otherwise any matching Allow allows; otherwise denied.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

STACK = {"AWS::Partition": "aws", "AWS::Region": "us-east-1", "AWS::AccountId": "123456789012",
         "AWS::StackName": "invmon", "ModelPackageGroupName": "bin-count", "PipelineName": "bin-count",
         "ArtifactBucketName": "invmon-artifacts", "DataBucketName": "aft-vbi-pds",
         "DeployFunctionCodeKey": "invmon/deploy-function.zip", "ReleaseBranch": "main",
         "MonitorJobPrefix": "invmon/monitor-job"}


def arn(template: dict, name: str) -> str:
    kind = template["Resources"][name]["Type"]
    if kind == "AWS::IAM::Role":
        return f"arn:aws:iam::123456789012:role/invmon-{name}-ABC"
    if kind == "AWS::Logs::LogGroup":  # its Arn attribute ends in :*
        return f"arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/invmon-deploy:*"
    if kind == "AWS::IAM::ManagedPolicy":
        return f"arn:aws:iam::123456789012:policy/invmon-{name}-ABC"
    if kind == "AWS::SNS::Topic":  # its Ref is its ARN
        return "arn:aws:sns:us-east-1:123456789012:invmon-alerts"
    raise ValueError(f"no ARN for {kind}")


def resolve(template: dict, value):
    """A policy with the template's functions replaced by this example stack's values."""
    if isinstance(value, dict) and len(value) == 1:
        (tag, arg), = value.items()
        if tag == "!Sub":
            text = arg
            for key, replacement in STACK.items():
                text = text.replace("${" + key + "}", replacement)
            assert "${" not in text, text
            return text
        if tag == "!GetAtt":
            return arn(template, arg.split(".")[0])
        if tag == "!Ref":
            return STACK.get(arg) or arn(template, arg)
    if isinstance(value, dict):
        return {k: resolve(template, v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(template, v) for v in value]
    return value


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def _condition_holds(condition: dict | None, context: dict) -> bool:
    for operator, tests in (condition or {}).items():
        for key, wanted in tests.items():
            wanted = [str(w) for w in _list(wanted)]
            present = key in context
            got = [str(v) for v in _list(context.get(key, []))]
            if operator == "StringEquals":
                ok = present and all(g in wanted for g in got)
            elif operator == "StringLike":
                ok = present and all(any(fnmatchcase(g, w) for w in wanted) for g in got)
            elif operator == "Bool":
                ok = present and got == [w.lower() for w in wanted]
            elif operator == "Null":  # "true": the key is absent; "false": present
                ok = (not present) == (wanted == ["true"])
            elif operator == "ForAnyValue:StringEquals":
                ok = any(g in wanted for g in got)
            else:
                raise AssertionError(f"the evaluator does not know the condition operator {operator}")
            if not ok:
                return False
    return True


def _matches(statement: dict, action: str, resource: str, context: dict) -> bool:
    actions = _list(statement["Action"])
    if not any(fnmatchcase(action.lower(), a.lower()) for a in actions):
        return False
    if not any(fnmatchcase(resource, r) for r in _list(statement.get("Resource", "*"))):
        return False
    return _condition_holds(statement.get("Condition"), context)


def allowed(documents: list[dict], action: str, resource: str, context: dict | None = None) -> bool:
    """Whether a principal with these (resolved) policy documents may do `action` on `resource`."""
    context = context or {}
    verdict = False
    for document in documents:
        for statement in document["Statement"]:
            if _matches(statement, action, resource, context):
                if statement["Effect"] == "Deny":
                    return False
                verdict = True
    return verdict
