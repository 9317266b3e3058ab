"""`invmon deploy` and `invmon endpoints` on both back-ends, and the back-end plumbing that
`invmon models approve/reject` share with them (the rules are in pipeline/registry/deploy.py)."""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import asdict

from pipeline.cli.aws import region_of
from pipeline.cli.conventions import add_json_option, print_json
from pipeline.cli.errors import CommandError, UsageError

LOG = logging.getLogger("invmon.deploy")


def add_commands(commands) -> None:
    deploy = commands.add_parser("deploy", help="deploy a model version to a stage's endpoint")
    deploy.add_argument("--stage", required=True, choices=["staging", "prod"],
                        help="staging (<group>-staging) or prod (<group>-production)")
    deploy.add_argument("--version", type=int, default=None,
                        help="model version (default: the newest Approved one)")
    backend_options(deploy)
    deploy.set_defaults(handler=cmd_deploy)

    endpoints = commands.add_parser("endpoints", help="both stages' endpoints and what they serve")
    backend_options(endpoints)
    endpoints.add_argument("--prune", action="store_true",
                           help="delete each endpoint's Models and EndpointConfigs older than its current "
                                "and previous version's (aws; never what an endpoint uses or switches to)")
    endpoints.add_argument("--dry-run", action="store_true", help="with --prune: list what would go, delete nothing")
    add_json_option(endpoints, "both stages' endpoints (with --prune: what each keeps, deletes and leaves)")
    endpoints.set_defaults(handler=cmd_endpoints)


def backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", default=None, help="model package group (default: bin-count)")
    parser.add_argument("--backend", choices=["local", "aws"], default="local")
    parser.add_argument("--region", default=None, help="AWS region (aws back-end)")
    parser.add_argument("--role-arn", default=None,
                        help="aws: the role SageMaker models run as (default: $INVMON_MODEL_ROLE_ARN)")
    parser.add_argument("--instance-type", default=None,
                        help="aws: endpoint instance type (default: $INVMON_INSTANCE_TYPE or ml.m5.large)")


def group_of(args) -> str:
    from pipeline.dag.parameters import BY_NAME

    return args.group or str(BY_NAME["ModelPackageGroupName"].default)


def registry_of(args):
    if args.backend == "aws":
        from pipeline.registry.sagemaker import SageMakerRegistry

        return SageMakerRegistry(region=region_of(args.region))
    from pipeline.home import invmon_home
    from pipeline.registry.local import open_registry

    return open_registry(invmon_home())


def target_of(args, registry):
    """Where endpoints live: records in the local registry, or SageMaker endpoints."""
    if args.backend == "aws":
        from pipeline.registry.deploy import sagemaker_target

        return sagemaker_target(registry.sm, getattr(args, "role_arn", None), getattr(args, "instance_type", None))
    from pipeline.registry.local_target import LocalTarget

    return LocalTarget(registry)


def one_line_errors(handler):
    """Registry, deploy and AWS failures become `invmon: error: ...` (exit 1), no traceback."""

    @functools.wraps(handler)
    def wrapped(args) -> int:
        from pipeline.sagemaker.clients import AwsError
        from pipeline.registry.local import RegistryError

        try:
            return handler(args)
        except (RegistryError, AwsError) as exc:
            raise CommandError(str(exc)) from None
    return wrapped


@one_line_errors
def cmd_deploy(args) -> int:
    from pipeline.registry import deploy

    registry = registry_of(args)
    outcome = deploy.deploy(registry, target_of(args, registry), group_of(args), args.stage,
                            args.version)
    print(outcome.message)
    if outcome.rollout:
        where = "rollout" if args.backend == "aws" else "rollout on SageMaker (this local record switched at once)"
        print(f"{where}: {outcome.rollout}")
    if outcome.pruned and (outcome.pruned.configs or outcome.pruned.models or outcome.pruned.errors):
        print(f"clean-up: {outcome.pruned.summary()}")
        for error in outcome.pruned.errors:
            LOG.warning(f"clean-up: {error}")
    if outcome.changed and args.backend == "aws":
        LOG.info(f"follow it: invmon endpoints --backend aws --group {group_of(args)}")
    return 0


@one_line_errors
def cmd_endpoints(args) -> int:
    from pipeline.registry.stages import STAGES, endpoint_name

    if args.dry_run and not args.prune:
        raise UsageError("--dry-run goes with --prune (invmon endpoints --prune --dry-run)")
    group = group_of(args)
    registry = registry_of(args)
    if args.prune:
        return prune(args, target_of(args, registry), group)
    found = {e.name: e for e in target_of(args, registry).endpoints(group)}
    names = {stage: endpoint_name(group, stage) for stage in STAGES}
    if args.json:
        print_json([endpoint_record(stage, name, found.get(name)) for stage, name in names.items()])
        return 0
    print(f"{'STAGE':<8} {'ENDPOINT':<28} {'VERSION':>7}  {'STATUS':<10} {'CHANGED':<32} FLAG")
    for stage, name in names.items():
        e = found.get(name)
        if e is None:
            print(f"{stage:<8} {name:<28} {'-':>7}  {'absent':<10}")
            continue
        status = e.status or "-"
        print(f"{stage:<8} {name:<28} {e.version:>7}  {status:<10} {e.updated_at:<32} {e.flag}")
    return 0


def endpoint_record(stage: str, name: str, endpoint) -> dict:
    """`endpoints --json`: one stage; an endpoint that does not exist has present false and nulls."""
    fields = asdict(endpoint) if endpoint is not None else {}
    return {"stage": stage, "name": name, "present": endpoint is not None,
            **{key: fields.get(key) for key in ("version", "status", "updated_at", "flag", "pending")}}


def prune(args, target, group: str) -> int:
    """`endpoints --prune [--dry-run]`: each stage's clean-up (pipeline/registry/cleanup.py); exit 1
    if anything could not be deleted."""
    from pipeline.registry.stages import STAGES, endpoint_name

    results = [target.prune(endpoint_name(group, stage), group, stage, dry_run=args.dry_run)
               for stage in STAGES]
    if args.json:
        print_json([{"endpoint": r.endpoint, "dry_run": args.dry_run, "note": r.note,
                     "kept": [{"name": n, "why": w} for n, w in r.kept],
                     "endpoint_configs": r.configs, "models": r.models,
                     "left": [{"name": n, "why": w} for n, w in r.left], "errors": r.errors} for r in results])
    else:
        verb = "would delete" if args.dry_run else "deleted"
        for r in results:
            print(r.summary(args.dry_run))
            for kind, names in (("endpoint config", r.configs), ("model", r.models)):
                for name in names:
                    print(f"  {verb} {kind} {name}")
            for name, why in r.left:
                print(f"  left {name}: {why}")
    for r in results:
        for error in r.errors:
            print(f"invmon: error: {r.endpoint}: {error}", file=sys.stderr)
    return 1 if any(r.errors for r in results) else 0
