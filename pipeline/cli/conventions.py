"""What every `invmon` command shares: -q/-v and logging, --json, --recipe and its deprecated
--profile spelling.

Messages that are not a command's result go through the `invmon` logger to stderr, so stdout
holds only the result (a table, a JSON document, a prediction) and `-q` leaves just that.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date, datetime

from pipeline.cli.errors import UsageError
from pipeline.dag.profiles import PROFILES

LOG = logging.getLogger("invmon")


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: it takes -q/-v too, so `invmon run -q` works as `invmon -q run`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a sub-command not given -q/-v keeps what the top level parsed.
        add_verbosity(self, default=argparse.SUPPRESS)


def add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="only warnings and errors on stderr")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="debug messages too (AWS commands: also the SageMaker SDK's own logging)")


class _Formatter(logging.Formatter):
    """Information as it is; warnings and errors named, like argparse's `invmon: error:`."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"invmon: {record.levelname.lower()}: {message}"
        return message


def configure_logging(quiet: bool, verbose: bool) -> None:
    """The `invmon` logger writes to this process's stderr at the chosen level; its records do
    not reach the root logger, which the SageMaker SDK configures on import."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    LOG.propagate = False


class _DeprecatedAlias(argparse.Action):
    """An old option name that still works. It leaves its warning in the namespace: logging is
    configured only once parsing is done (main() logs it)."""

    def __init__(self, *args, replacement: str, why: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replacement, self.why = replacement, why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        notes = getattr(namespace, "deprecations", [])
        namespace.deprecations = [*notes, f"{option_string} is deprecated ({self.why}): use "
                                          f"{self.replacement}"]


def add_recipe_option(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    """--recipe NAME: the profile whose parameter defaults apply (pipeline/dag/profiles.py)."""
    parser.add_argument("--recipe", default=default, choices=list(PROFILES), help=help)
    # The option's old name, hidden from the help: to AWS users --profile names credentials.
    parser.add_argument("--profile", dest="recipe", choices=list(PROFILES), default=argparse.SUPPRESS,
                        action=_DeprecatedAlias, replacement="--recipe",
                        why="to the AWS CLI, --profile names credentials", help=argparse.SUPPRESS)


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as one JSON document (keys: docs/cli.md)")


def _json_value(value):
    if isinstance(value, (datetime, date)):  # boto3 answers hold datetimes
        return value.isoformat()
    return str(value)


def print_json(document) -> None:
    """The command's whole stdout under --json."""
    print(json.dumps(document, indent=2, default=_json_value))


def checked_parameters(assignments: list[str], base: dict | None = None) -> dict:
    """--param NAME=VALUE items, typed and checked on top of `base` (a recipe's defaults; none
    for `start`, where the deployed definition holds the rest). A bad value is a usage error.
    Returns the assignments alone."""
    from pipeline.dag.parameters import ParameterError, parse_assignments, validate

    try:
        assigned = parse_assignments(assignments)
        validate({**(base or {}), **assigned})
    except ParameterError as exc:
        raise UsageError(str(exc)) from None
    return assigned
