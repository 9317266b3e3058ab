"""`invmon`: the command line of the bin-count pipeline.

Each module registers its commands: local.py (run, runs, serve, predict, models, data),
aws.py (definition, upsert, start, status, executions), deploy.py (deploy, endpoints). None of
them imports the SageMaker SDK at import time, so the local path never needs it. What they share
(-q/-v and logging, --json, --recipe) is in conventions.py; the errors they raise in errors.py.
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata

from pipeline.cli import aws as cli_aws
from pipeline.cli import deploy as cli_deploy
from pipeline.cli import local as cli_local
from pipeline.cli.conventions import LOG, CommandParser, add_verbosity, configure_logging
from pipeline.cli.errors import CommandError


def _version() -> str:
    try:
        return metadata.version("invmon")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invmon", description="Count items in warehouse bin photos: pipeline, registry, endpoint.")
    parser.add_argument("--version", action="version", version=f"invmon {_version()}",
                        help="print `invmon <version>` and exit")
    add_verbosity(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=CommandParser)
    cli_local.add_commands(commands)
    cli_aws.add_commands(commands)
    cli_deploy.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(quiet=args.quiet, verbose=args.verbose)
    for warning in getattr(args, "deprecations", []):
        LOG.warning(warning)
    try:
        return int(args.handler(args) or 0)
    except CommandError as exc:
        print(f"invmon: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("invmon: interrupted", file=sys.stderr)
        return 130
