"""`invmon`: the command line of the bin-count pipeline.

Each module registers its commands: local.py (run, runs, serve, predict, models, data),
aws.py (definition, upsert, start, status, executions), deploy.py (deploy, endpoints). None of
them imports the SageMaker SDK at import time, so the local path never needs it.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.cli import aws as cli_aws
from pipeline.cli import deploy as cli_deploy
from pipeline.cli import local as cli_local
from pipeline.cli.errors import CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invmon", description="Count items in warehouse bin photos: pipeline, registry, endpoint."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_local.add_commands(commands)
    cli_aws.add_commands(commands)
    cli_deploy.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CommandError as exc:
        print(f"invmon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("invmon: interrupted", file=sys.stderr)
        return 130
