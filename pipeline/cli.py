"""`invmon`: the command line of the bin-count pipeline.

Local commands live here; the AWS commands (definition, upsert, start, status, executions) are
registered by pipeline/cli_aws.py so that nothing on the local path imports the SageMaker SDK.
"""
from __future__ import annotations

import argparse
import sys


class CommandError(Exception):
    """A user-facing error: printed as `invmon: error: ...`, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invmon", description="Count items in warehouse bin photos: pipeline, registry, endpoint."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from pipeline import cli_aws, cli_deploy, cli_local

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
