"""The clean-up after a switch: an endpoint's older Models and EndpointConfigs are deleted.

A deploy keeps the Models and EndpointConfigs of the current and the previous version and deletes
this endpoint's older ones, never what an endpoint uses or an update in progress switches to, and
only what carries the group's and stage's tags (pipeline/registry/labels.py). `invmon endpoints
--prune [--dry-run]` runs the same clean-up by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.registry.labels import GROUP_TAG, PACKAGE_ARN, PACKAGE_ENV, STAGE_TAG
from pipeline.registry.local import RegistryError
from pipeline.registry.stages import STAGES, DeployError, endpoint_name


@dataclass
class Pruned:
    """A clean-up of one endpoint's Models and EndpointConfigs: what it keeps and why, what it
    deletes (or would, in a dry run), what it leaves alone and why, and what failed."""
    endpoint: str
    kept: list[tuple[str, str]] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""

    def summary(self, dry_run: bool = False) -> str:
        if self.note:
            return f"{self.endpoint}: {self.note}"
        kept = ", ".join(f"{name} ({why})" for name, why in self.kept) or "nothing"
        verb = "would delete" if dry_run else "deleted"
        gone = (f"{verb} {len(self.configs)} endpoint config(s) and {len(self.models)} model(s)"
                if self.configs or self.models else "nothing to delete")
        return f"{self.endpoint}: {gone}; kept {kept}"


def tidy(target, name: str, group: str, stage: str) -> Pruned:
    """The clean-up after a switch. It never fails the deploy it follows: what it could not do is
    in the result's errors (and the next deploy, or `invmon endpoints --prune`, tries again)."""
    try:
        return target.prune(name, group, stage)
    except RegistryError as exc:
        return Pruned(name, errors=[str(exc)])


# --------------------------------------------------------------------------- SageMaker
# `target` below is a SageMakerTarget: its SageMaker client and its one-line-error requests.


def _models_of(config: dict) -> list[str]:
    return [v["ModelName"] for v in config.get("ProductionVariants") or [] if v.get("ModelName")]


def _container(model: dict) -> dict:
    return (model.get("Containers") or [model.get("PrimaryContainer") or {}])[0]


def _in_use(target, group: str) -> tuple[set[str], set[str]]:
    """The endpoint configs the group's two endpoints use or switch to, and their models."""
    configs: set[str] = set()
    for stage in STAGES:
        endpoint = target.describe(endpoint_name(group, stage)) or {}
        configs |= {endpoint.get("EndpointConfigName"),
                    (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")}
    configs.discard(None)
    models = set()
    for config in configs:
        try:
            models |= set(_models_of(target.call(target.sm.describe_endpoint_config, EndpointConfigName=config)))
        except DeployError as exc:  # unknown is not "unused": nothing is deleted
            raise DeployError(f"what {config} serves could not be read ({exc}); nothing was deleted") from None
    return configs, models


def _tags(target, arn: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in target.call(target.sm.list_tags, ResourceArn=arn).get("Tags", [])}


def _candidates(target, name: str) -> list[dict]:
    """The endpoint configs named for `name`: the deploy code's `<name[:38]>-v<version>-...` and
    the pipeline's staging Deploy's `<name>-<execution id>`, oldest first."""
    found, token = [], None
    while True:
        page = target.call(target.sm.list_endpoint_configs, NameContains=name[:38], MaxResults=100,
                           **({"NextToken": token} if token else {}))
        found += [c for c in page.get("EndpointConfigs", [])
                  if c["EndpointConfigName"].startswith((f"{name}-", f"{name[:38]}-v"))]
        token = page.get("NextToken")
        if not token:
            return sorted(found, key=lambda c: (c["CreationTime"], c["EndpointConfigName"]))


def prune(target, name: str, group: str, stage: str, dry_run: bool = False) -> Pruned:
    """Delete this endpoint's older Models and EndpointConfigs: all but the config it uses,
    the one an update in progress switches to, and the newest one of another version (the
    previous version's, for a rollback). Only what carries this group's and stage's tags is
    touched (the deploy role may delete nothing else), and what either of the group's
    endpoints uses or switches to is read again right before anything is deleted. A later
    deploy of a deleted version makes them again from its verified copy under registry/."""
    result = Pruned(name)
    endpoint = target.describe(name)
    if endpoint is None:
        result.note = "no such endpoint: nothing is pruned (what it would keep cannot be told)"
        return result
    current = endpoint["EndpointConfigName"]
    pending = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
    own, described = [], {}
    for summary in _candidates(target, name):
        config = summary["EndpointConfigName"]
        tags = _tags(target, summary["EndpointConfigArn"])
        if (tags.get(GROUP_TAG), tags.get(STAGE_TAG)) != (group, STAGES[stage]):
            if config not in (current, pending):
                result.left.append((config, f"not tagged {GROUP_TAG}={group}, {STAGE_TAG}={STAGES[stage]}"))
            continue
        own.append(config)
        described[config] = target.call(target.sm.describe_endpoint_config, EndpointConfigName=config)
    for config in (current, pending):  # kept whoever made them; their models with them
        if config and config not in described:
            described[config] = target.call(target.sm.describe_endpoint_config, EndpointConfigName=config)
    models: dict[str, dict | None] = {}

    def model(model_name: str) -> dict | None:
        if model_name not in models:
            try:
                models[model_name] = target.call(target.sm.describe_model, ModelName=model_name)
            except DeployError:
                models[model_name] = None  # gone already, or unreadable: left alone
        return models[model_name]

    def version_of(config: str) -> str:  # configs of an unknown version count as their own
        found = [model(m) for m in _models_of(described[config])]
        arns = [(_container(m).get("Environment") or {}).get(PACKAGE_ENV, "") for m in found if m]
        matched = PACKAGE_ARN.search(arns[0]) if len(arns) == 1 else None
        return f"version {matched['version']}" if matched else config

    others = [c for c in own if c not in (current, pending) and version_of(c) != version_of(current)]
    previous = others[-1] if others else None  # the newest: what was served before, or tried
    result.kept = [(c, why) for c, why in ((current, f"current, {version_of(current)}"),
                                           (pending, "an update in progress switches to it"),
                                           (previous, f"previous, {version_of(previous) if previous else ''}"))
                   if c]
    doomed = [c for c in own if c not in (current, pending, previous)]
    keep_models = {m for c in (current, pending, previous) if c in described for m in _models_of(described[c])}
    for config in doomed:
        for model_name in _models_of(described[config]):
            found = model(model_name)
            if model_name in keep_models or model_name in result.models:
                continue
            if found is None:
                result.left.append((model_name, "could not be read"))
            elif _tags(target, found["ModelArn"]).get(GROUP_TAG) != group:
                result.left.append((model_name, f"not tagged {GROUP_TAG}={group}"))
            else:
                result.models.append(model_name)
    result.configs = doomed
    if dry_run or not (doomed or result.models):
        return result
    in_use, used_models = _in_use(target, group)  # read again: a deploy may have started since
    for kind, names, used, delete in (
            ("endpoint config", result.configs, in_use, lambda n: target.call(
                target.sm.delete_endpoint_config, EndpointConfigName=n)),
            ("model", result.models, used_models, lambda n: target.call(target.sm.delete_model, ModelName=n))):
        for item in list(names):
            if item in used:
                names.remove(item)
                result.left.append((item, "an endpoint uses it or switches to it now"))
                continue
            try:
                delete(item)
            except DeployError as exc:
                names.remove(item)
                result.errors.append(f"{kind} {item}: {exc}")
    return result
